package cni

import (
	"encoding/json"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/vnetbpf/vnetbpf/pkg/api"
)

// fakeAgent serves the pkg/api routes the plugin calls from memory, on a Unix socket, and
// records what it was asked so tests can see what the plugin did to the agent's state.
type fakeAgent struct {
	socket string
	srv    *httptest.Server

	mu        sync.Mutex
	next      netip.Addr
	allocs    map[api.Key]api.Allocation
	endpoints map[api.Key]api.Endpoint
	released  []api.Key // keys whose address was freed, by Release or DeleteEndpoint
	gcValid   [][]api.Key
	status    api.Status
	failAlloc *api.Error // answer to every Allocate when set
	failPut   *api.Error // answer to every PutEndpoint when set
	mtu       int
	// hook sees every request first and answers it instead of the routes when it returns true.
	hook func(w http.ResponseWriter, r *http.Request) bool
}

func newFakeAgent(t *testing.T) *fakeAgent {
	t.Helper()
	// A socket path must fit in 108 bytes, which t.TempDir under a long test name may not.
	dir, err := os.MkdirTemp("", "vnbcni")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	f := &fakeAgent{
		socket:    filepath.Join(dir, "agent.sock"),
		next:      netip.MustParseAddr("10.1.0.10"),
		allocs:    map[api.Key]api.Allocation{},
		endpoints: map[api.Key]api.Endpoint{},
		status:    api.Status{Ready: true, CanAllocate: true},
		mtu:       1400,
	}
	l, err := net.Listen("unix", f.socket)
	if err != nil {
		t.Fatal(err)
	}
	f.srv = httptest.NewUnstartedServer(f.routes())
	f.srv.Listener = l
	f.srv.Start()
	t.Cleanup(f.stop)
	return f
}

// stop makes the agent unreachable, as a stopped vnetbpf-agent is.
func (f *fakeAgent) stop() { f.srv.Close() }

func (f *fakeAgent) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/ipam/allocations", f.allocate)
	mux.HandleFunc("DELETE /v1/ipam/allocations/{containerID}/{ifName}", f.release)
	mux.HandleFunc("PUT /v1/endpoints/{containerID}/{ifName}", f.putEndpoint)
	mux.HandleFunc("GET /v1/endpoints/{containerID}/{ifName}", f.getEndpoint)
	mux.HandleFunc("DELETE /v1/endpoints/{containerID}/{ifName}", f.deleteEndpoint)
	mux.HandleFunc("POST /v1/gc", f.gc)
	mux.HandleFunc("GET /v1/status", f.getStatus)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f.mu.Lock()
		hook := f.hook
		f.mu.Unlock()
		if hook != nil && hook(w, r) {
			return
		}
		mux.ServeHTTP(w, r)
	})
}

func pathKey(r *http.Request) api.Key {
	return api.Key{ContainerID: r.PathValue("containerID"), IfName: r.PathValue("ifName")}
}

func reply(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	if v != nil {
		_ = json.NewEncoder(w).Encode(v)
	}
}

func replyError(w http.ResponseWriter, e *api.Error) { reply(w, http.StatusConflict, e) }

func (f *fakeAgent) allocate(w http.ResponseWriter, r *http.Request) {
	var req api.AllocationRequest
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		replyError(w, &api.Error{Code: api.CodeDecodingFailure, Msg: err.Error()})
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failAlloc != nil {
		replyError(w, f.failAlloc)
		return
	}
	// Like the real agent: a known key gets its address again.
	a, ok := f.allocs[req.Key]
	if !ok {
		a = api.Allocation{Owner: req.Owner, IP: f.next, Gateway: api.GatewayIP, MTU: f.mtu, AllocatedAt: time.Now()}
		f.next = f.next.Next()
		f.allocs[req.Key] = a
	}
	reply(w, http.StatusOK, a)
}

func (f *fakeAgent) release(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.free(pathKey(r))
	w.WriteHeader(http.StatusNoContent)
}

// free must be called with mu held.
func (f *fakeAgent) free(k api.Key) {
	if _, ok := f.allocs[k]; ok {
		delete(f.allocs, k)
		f.released = append(f.released, k)
	}
}

func (f *fakeAgent) putEndpoint(w http.ResponseWriter, r *http.Request) {
	var req api.EndpointRequest
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		replyError(w, &api.Error{Code: api.CodeDecodingFailure, Msg: err.Error()})
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failPut != nil {
		replyError(w, f.failPut)
		return
	}
	if a, ok := f.allocs[req.Key]; !ok || a.IP != req.IP {
		replyError(w, &api.Error{Code: api.CodeUnknownContainer, Msg: "no allocation for " + req.Key.String()})
		return
	}
	ep := api.Endpoint{EndpointRequest: req, ID: uint32(len(f.endpoints) + 1), CreatedAt: time.Now()}
	f.endpoints[req.Key] = ep
	reply(w, http.StatusOK, ep)
}

func (f *fakeAgent) getEndpoint(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	ep, ok := f.endpoints[pathKey(r)]
	if !ok {
		reply(w, http.StatusNotFound, &api.Error{Code: api.CodeUnknownContainer, Msg: "no endpoint " + pathKey(r).String()})
		return
	}
	reply(w, http.StatusOK, ep)
}

func (f *fakeAgent) deleteEndpoint(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.endpoints, pathKey(r))
	f.free(pathKey(r))
	w.WriteHeader(http.StatusNoContent)
}

func (f *fakeAgent) gc(w http.ResponseWriter, r *http.Request) {
	var req api.GCRequest
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		replyError(w, &api.Error{Code: api.CodeDecodingFailure, Msg: err.Error()})
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.gcValid = append(f.gcValid, req.ValidAttachments)
	valid := map[api.Key]bool{}
	for _, k := range req.ValidAttachments {
		valid[k] = true
	}
	var resp api.GCResponse
	for k := range f.allocs {
		if !valid[k] {
			delete(f.endpoints, k)
			f.free(k)
			resp.Released = append(resp.Released, k)
		}
	}
	reply(w, http.StatusOK, resp)
}

func (f *fakeAgent) getStatus(w http.ResponseWriter, _ *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	reply(w, http.StatusOK, f.status)
}

// snapshot returns copies of the agent's state for assertions.
func (f *fakeAgent) snapshot() (allocs map[api.Key]api.Allocation, endpoints map[api.Key]api.Endpoint, released []api.Key) {
	f.mu.Lock()
	defer f.mu.Unlock()
	allocs = map[api.Key]api.Allocation{}
	for k, v := range f.allocs {
		allocs[k] = v
	}
	endpoints = map[api.Key]api.Endpoint{}
	for k, v := range f.endpoints {
		endpoints[k] = v
	}
	return allocs, endpoints, append([]api.Key(nil), f.released...)
}

func (f *fakeAgent) set(fn func(f *fakeAgent)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fn(f)
}
