package ipam

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/vnetbpf/vnetbpf/pkg/api"
	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// Layout of the state file. Keys and values are text, so that `bbolt keys` and `bbolt get`
// show something a person can read while debugging a node.
var (
	// bucketMeta holds the schema version, so that a later layout can migrate or refuse.
	bucketMeta = []byte("meta")
	// bucketAllocations maps containerID "\x00" ifName to the JSON of an api.Allocation.
	bucketAllocations = []byte("allocations")
	// bucketReleased maps an address to when it was last released (RFC 3339, UTC): the
	// cooldown and the least-recently-used choice must survive a restart.
	bucketReleased = []byte("released")

	keySchema = []byte("schema")
)

const schemaVersion = "1"

// storeKey is the allocation's key in bucketAllocations. NUL cannot occur in either part
// (validKey refuses it), so the encoding is unambiguous.
func storeKey(k api.Key) []byte {
	return []byte(k.ContainerID + "\x00" + k.IfName)
}

func putAllocation(tx *bolt.Tx, a api.Allocation) error {
	v, err := json.Marshal(a)
	if err != nil {
		return err
	}
	return tx.Bucket(bucketAllocations).Put(storeKey(a.Key), v)
}

func putReleased(tx *bolt.Tx, ip netip.Addr, at time.Time) error {
	return tx.Bucket(bucketReleased).Put([]byte(ip.String()), []byte(at.UTC().Format(time.RFC3339Nano)))
}

// openBolt opens the file and classifies bbolt's errors into ones a person can act on.
func openBolt(path string, lockTimeout time.Duration) (db *bolt.DB, err error) {
	defer func() {
		// bbolt trusts the pages it reads and panics on some garbage (a bad freelist page,
		// for one); that is a corrupt file, not a bug of the agent.
		if r := recover(); r != nil {
			db, err = nil, fmt.Errorf("%s: %w: bbolt panicked opening it: %v", path, ErrCorrupt, r)
		}
	}()
	// NoSync stays false: every committed transaction is fsync'ed before Update returns,
	// which is what lets the CNI binary trust an answer.
	db, err = bolt.Open(path, 0o600, &bolt.Options{Timeout: lockTimeout})
	switch {
	case err == nil:
		return db, nil
	case errors.Is(err, berrors.ErrTimeout):
		return nil, fmt.Errorf("state file %s is locked by another process (is another vnetbpf-agent using it?); gave up after %s: %w", path, lockTimeout, err)
	case errors.Is(err, berrors.ErrInvalid), errors.Is(err, berrors.ErrChecksum),
		errors.Is(err, berrors.ErrVersionMismatch), errors.Is(err, berrors.ErrInvalidMapping):
		return nil, fmt.Errorf("%s: %w: %w", path, ErrCorrupt, err)
	default:
		return nil, fmt.Errorf("open state file %s: %w", path, err)
	}
}

// syncDir makes a newly created file's directory entry durable; bbolt fsyncs the file but
// not the directory, so a power cut right after the first allocation could lose the file.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// load checks the file and fills the in-memory index. It runs before the pool is shared,
// so it sets the fields without locks.
func (p *Pool) load() (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%s: %w: bbolt panicked reading it: %v", p.path, ErrCorrupt, r)
		}
	}()
	initialised := false
	err = p.db.View(func(tx *bolt.Tx) error {
		// A full check is cheap for a file of this size, and it is better to refuse to start
		// than to write into a damaged tree and spread the damage.
		if err := checkTx(tx); err != nil {
			return fmt.Errorf("%s: %w: %w", p.path, ErrCorrupt, err)
		}
		if meta := tx.Bucket(bucketMeta); meta != nil {
			if v := string(meta.Get(keySchema)); v != schemaVersion {
				return fmt.Errorf("state file %s has schema version %q, this agent understands %q (was it written by a newer agent?)", p.path, v, schemaVersion)
			}
			initialised = tx.Bucket(bucketAllocations) != nil && tx.Bucket(bucketReleased) != nil
		}
		if err := p.loadAllocations(tx.Bucket(bucketAllocations)); err != nil {
			return fmt.Errorf("%s: %w: %w", p.path, ErrCorrupt, err)
		}
		if err := p.loadReleased(tx.Bucket(bucketReleased)); err != nil {
			return fmt.Errorf("%s: %w: %w", p.path, ErrCorrupt, err)
		}
		return nil
	})
	if err != nil || initialised {
		return err
	}
	err = p.db.Update(func(tx *bolt.Tx) error {
		for _, name := range [][]byte{bucketMeta, bucketAllocations, bucketReleased} {
			if _, err := tx.CreateBucketIfNotExists(name); err != nil {
				return err
			}
		}
		return tx.Bucket(bucketMeta).Put(keySchema, []byte(schemaVersion))
	})
	if err != nil {
		return fmt.Errorf("initialise state file %s: %w", p.path, err)
	}
	return nil
}

func checkTx(tx *bolt.Tx) error {
	var first []string
	n := 0
	// Drain the channel: the checker's goroutine blocks until every error is read.
	for err := range tx.Check() {
		if n++; n <= 3 {
			first = append(first, err.Error())
		}
	}
	switch {
	case n == 0:
		return nil
	case n > len(first):
		return fmt.Errorf("%s (and %d more problems)", strings.Join(first, "; "), n-len(first))
	default:
		return errors.New(strings.Join(first, "; "))
	}
}

func (p *Pool) loadAllocations(b *bolt.Bucket) error {
	if b == nil {
		return nil
	}
	return b.ForEach(func(k, v []byte) error {
		var a api.Allocation
		if err := json.Unmarshal(v, &a); err != nil {
			return fmt.Errorf("allocation %q: %w", printable(k), err)
		}
		if string(storeKey(a.Key)) != string(k) {
			return fmt.Errorf("allocation %q is stored under the key of %s", printable(k), a.Key)
		}
		if err := validKey(a.Key); err != nil {
			return fmt.Errorf("allocation %q: %w", printable(k), err)
		}
		if !a.IP.IsValid() {
			return fmt.Errorf("allocation %q has no address", printable(k))
		}
		if holder, ok := p.byIP[a.IP]; ok {
			return fmt.Errorf("%s is allocated to both %s and %s", a.IP, holder, a.Key)
		}
		p.byKey[a.Key] = a
		p.byIP[a.IP] = a.Key
		return nil
	})
}

func (p *Pool) loadReleased(b *bolt.Bucket) error {
	if b == nil {
		return nil
	}
	return b.ForEach(func(k, v []byte) error {
		ip, err := netip.ParseAddr(string(k))
		if err != nil {
			return fmt.Errorf("release record %q: %w", printable(k), err)
		}
		at, err := time.Parse(time.RFC3339Nano, string(v))
		if err != nil {
			return fmt.Errorf("release record of %s: %w", ip, err)
		}
		p.released[ip] = at
		return nil
	})
}

func printable(k []byte) string {
	return strings.ReplaceAll(string(k), "\x00", "/")
}

func ensureDir(path string) (dir string, created bool, err error) {
	dir = filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", false, fmt.Errorf("create state directory: %w", err)
	}
	_, err = os.Stat(path)
	switch {
	case err == nil:
		return dir, false, nil
	case errors.Is(err, os.ErrNotExist):
		return dir, true, nil
	default:
		return "", false, fmt.Errorf("state file: %w", err)
	}
}
