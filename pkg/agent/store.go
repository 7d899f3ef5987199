package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/vnetbpf/vnetbpf/pkg/api"
)

var endpointsBucket = []byte("endpoints")

// endpointStore keeps the registered endpoints in bbolt: which host veth, MACs and id each
// container interface has. The address itself lives in the IPAM store; the two are joined by
// key and reconciled at start.
type endpointStore struct {
	db *bolt.DB
}

func openEndpointStore(path string) (s *endpointStore, err error) {
	defer func() {
		// bbolt trusts the pages it reads and panics on some garbage: a corrupt file.
		if r := recover(); r != nil {
			s, err = nil, fmt.Errorf("%s: %w: bbolt panicked opening it: %v", path, errCorrupt, r)
		}
	}()
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if errors.Is(err, bolt.ErrTimeout) {
		return nil, fmt.Errorf("open %s: another vnetbpf-agent holds it (one agent per stateDir)", path)
	}
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		_, err := tx.CreateBucketIfNotExists(endpointsBucket)
		return err
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("init %s: %w", path, err)
	}
	s = &endpointStore{db: db}
	// Read every record now, so that a file whose pages are sound but whose records are not
	// is found at open, where it can be moved aside, and not half way through a reconcile.
	if _, err := s.all(); err != nil {
		db.Close()
		return nil, fmt.Errorf("%s: %w: %v", path, errCorrupt, err)
	}
	return s, nil
}

func (s *endpointStore) Close() error { return s.db.Close() }

func storeKey(k api.Key) []byte { return []byte(k.ContainerID + "\x00" + k.IfName) }

func (s *endpointStore) put(ep api.Endpoint) error {
	ep.RxPackets, ep.TxPackets = 0, 0
	b, err := json.Marshal(ep)
	if err != nil {
		return err
	}
	return s.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(endpointsBucket).Put(storeKey(ep.Key), b)
	})
}

func (s *endpointStore) delete(k api.Key) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(endpointsBucket).Delete(storeKey(k))
	})
}

// all returns every endpoint, sorted by key.
func (s *endpointStore) all() ([]api.Endpoint, error) {
	var out []api.Endpoint
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(endpointsBucket).ForEach(func(k, v []byte) error {
			var ep api.Endpoint
			if err := json.Unmarshal(v, &ep); err != nil {
				return fmt.Errorf("endpoint record %q: %w", k, err)
			}
			out = append(out, ep)
			return nil
		})
	})
	sort.Slice(out, func(i, j int) bool { return out[i].Key.String() < out[j].Key.String() })
	return out, err
}
