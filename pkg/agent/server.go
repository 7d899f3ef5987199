package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"syscall"
	"time"
	"unicode"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/vnetbpf/vnetbpf/pkg/api"
)

// serveAPI listens on the Unix socket (mode 0600: whoever can talk to it can take addresses
// and program the datapath) and serves the CNI API.
func (a *Agent) serveAPI(errc chan<- error) (*http.Server, error) {
	if err := os.MkdirAll(filepath.Dir(a.cfg.Socket), 0o700); err != nil {
		return nil, fmt.Errorf("socket directory: %w", err)
	}
	if err := os.Remove(a.cfg.Socket); err != nil && !os.IsNotExist(err) {
		return nil, fmt.Errorf("remove stale socket: %w", err)
	}
	old := syscall.Umask(0o177)
	ln, err := net.Listen("unix", a.cfg.Socket)
	syscall.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", a.cfg.Socket, err)
	}
	if err := os.Chmod(a.cfg.Socket, 0o600); err != nil {
		ln.Close()
		return nil, err
	}
	mux := http.NewServeMux()
	route := func(pattern string, h func(*http.Request) (any, *apiError)) {
		mux.Handle(pattern, a.metrics.instrument(pattern, jsonHandler(h)))
	}
	// The calls a CNI ADD, DEL and GC make: background work waits until none is running.
	cni := func(pattern string, h func(*http.Request) (any, *apiError)) {
		mux.Handle(pattern, a.settle.track(a.metrics.instrument(pattern, jsonHandler(h))))
	}
	cni("POST /v1/ipam/allocations", a.handleAllocate)
	cni("DELETE /v1/ipam/allocations/{containerID}/{ifName}", a.handleRelease)
	route("GET /v1/ipam", a.handlePool)
	cni("PUT /v1/endpoints/{containerID}/{ifName}", a.handlePutEndpoint)
	route("GET /v1/endpoints/{containerID}/{ifName}", a.handleGetEndpoint)
	cni("DELETE /v1/endpoints/{containerID}/{ifName}", a.handleRelease)
	route("GET /v1/endpoints", func(*http.Request) (any, *apiError) { return a.listEndpoints(), nil })
	cni("POST /v1/gc", a.handleGC)
	route("GET /v1/status", func(*http.Request) (any, *apiError) { return a.status(), nil })
	mux.HandleFunc("GET /v1/events", a.handleEvents)

	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			errc <- fmt.Errorf("API server: %w", err)
		}
	}()
	return srv, nil
}

func jsonHandler(h func(*http.Request) (any, *apiError)) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		out, aerr := h(r)
		w.Header().Set("Content-Type", "application/json")
		if aerr != nil {
			w.WriteHeader(aerr.status)
			json.NewEncoder(w).Encode(aerr.body)
			return
		}
		if out == nil {
			w.WriteHeader(http.StatusNoContent)
			return
		}
		json.NewEncoder(w).Encode(out)
	})
}

// decode reads a JSON body strictly: unknown fields and trailing data are errors.
func decode(r *http.Request, v any) *apiError {
	dec := json.NewDecoder(io.LimitReader(r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return errorf(http.StatusBadRequest, api.CodeDecodingFailure, "invalid request body: %v", err)
	}
	// Another value, or even a stray '}' (which dec.More does not see), is trailing data.
	if err := dec.Decode(new(json.RawMessage)); err != io.EOF {
		return errorf(http.StatusBadRequest, api.CodeDecodingFailure, "invalid request body: trailing data after the JSON object")
	}
	return nil
}

// The CNI spec: a container ID is alphanumerics plus _ . -; an interface name is at most 15
// bytes (IFNAMSIZ-1) with no / or whitespace, and not . or ..
var containerIDRE = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`)

// Both come from the runtime's CNI_CONTAINERID and CNI_IFNAME, so a bad one is CNI's code 4
// (invalid environment variables), as the CNI library itself answers.
func validateKey(k api.Key) *apiError {
	if len(k.ContainerID) == 0 || len(k.ContainerID) > 1024 || !containerIDRE.MatchString(k.ContainerID) {
		return errorf(http.StatusBadRequest, api.CodeInvalidEnvironment,
			"container ID %q is invalid: want letters, digits, '_', '.' or '-'", k.ContainerID)
	}
	// The kernel's dev_valid_name: at most IFNAMSIZ-1 bytes, no '/', ':' or white space.
	if len(k.IfName) == 0 || len(k.IfName) > 15 || k.IfName == "." || k.IfName == ".." ||
		strings.ContainsFunc(k.IfName, func(r rune) bool { return r == '/' || r == ':' || unicode.IsSpace(r) }) {
		return errorf(http.StatusBadRequest, api.CodeInvalidEnvironment,
			"interface name %q is invalid: want 1 to 15 bytes without '/', ':' or white space, and not '.' or '..'", k.IfName)
	}
	return nil
}

func validateOwner(o api.Owner) *apiError {
	if aerr := validateKey(o.Key); aerr != nil {
		return aerr
	}
	if o.Netns != "" {
		if err := ns.IsNSorErr(o.Netns); err != nil {
			return errorf(http.StatusBadRequest, api.CodeInvalidEnvironment, "netns %q is not a network namespace: %v", o.Netns, err)
		}
	}
	return nil
}

func pathKey(r *http.Request) (api.Key, *apiError) {
	k := api.Key{ContainerID: r.PathValue("containerID"), IfName: r.PathValue("ifName")}
	return k, validateKey(k)
}

func (a *Agent) handleAllocate(r *http.Request) (any, *apiError) {
	var req api.AllocationRequest
	if aerr := decode(r, &req); aerr != nil {
		return nil, aerr
	}
	if aerr := validateOwner(req.Owner); aerr != nil {
		return nil, aerr
	}
	return a.allocate(r.Context(), req)
}

func (a *Agent) handleRelease(r *http.Request) (any, *apiError) {
	k, aerr := pathKey(r)
	if aerr != nil {
		return nil, aerr
	}
	return nil, a.release(k)
}

func (a *Agent) handlePool(*http.Request) (any, *apiError) {
	return a.poolState(), nil
}

// poolState is the pool with the provider's side of it.
func (a *Agent) poolState() api.PoolState {
	st := a.pool.State()
	st.Provider = a.provider.Name()
	if a.grower != nil {
		ps := a.grower.Status()
		st.IPConfigs, st.Pending, st.LastError, st.LastErrorTime = ps.IPConfigs, ps.Pending, ps.LastError, ps.LastErrorAt
	}
	return st
}

func (a *Agent) handlePutEndpoint(r *http.Request) (any, *apiError) {
	k, aerr := pathKey(r)
	if aerr != nil {
		return nil, aerr
	}
	var req api.EndpointRequest
	if aerr := decode(r, &req); aerr != nil {
		return nil, aerr
	}
	if req.Key != k {
		return nil, errorf(http.StatusBadRequest, api.CodeInvalidConfig, "body key %s does not match path key %s", req.Key, k)
	}
	if aerr := validateOwner(req.Owner); aerr != nil {
		return nil, aerr
	}
	return a.putEndpoint(req)
}

func (a *Agent) handleGetEndpoint(r *http.Request) (any, *apiError) {
	k, aerr := pathKey(r)
	if aerr != nil {
		return nil, aerr
	}
	ep, ok := a.endpoint(k)
	if !ok {
		return nil, errorf(http.StatusNotFound, api.CodeUnknownContainer, "no endpoint for %s", k)
	}
	return ep, nil
}

func (a *Agent) handleGC(r *http.Request) (any, *apiError) {
	var req api.GCRequest
	if aerr := decode(r, &req); aerr != nil {
		return nil, aerr
	}
	for _, k := range req.ValidAttachments {
		if aerr := validateKey(k); aerr != nil {
			return nil, aerr
		}
	}
	return a.gc(req.ValidAttachments)
}

func (a *Agent) status() api.Status {
	pool := a.poolState()
	pool.Addresses = nil
	s := api.Status{
		Version: Version, Ready: a.ready.Load(), Pool: pool, NIC: a.nic.name,
		AttachMode: string(a.dp.Mode()), EndpointAttachMode: string(a.dp.EndpointMode()), StartedAt: a.started.UTC(),
	}
	a.mu.Lock()
	s.Endpoints, s.EndpointsOnClsBPF = len(a.endpoints), len(a.settle.unsettled)
	a.mu.Unlock()
	s.CanAllocate = pool.Free > 0
	if !s.CanAllocate {
		s.Reason = fmt.Sprintf("no free address: %d in the pool, %d in use, %d cooling down", pool.Size, pool.Used, pool.Cooling)
		if a.grower != nil {
			s.Reason += fmt.Sprintf("; %d IP configurations being added", pool.Pending)
			if pool.LastError != "" {
				s.Reason += "; last Azure error: " + pool.LastError
			}
		}
	}
	return s
}

// handleEvents streams drop events as JSON lines until the client goes away.
func (a *Agent) handleEvents(w http.ResponseWriter, r *http.Request) {
	flusher, ok := w.(http.Flusher)
	if !ok {
		http.Error(w, "streaming unsupported", http.StatusInternalServerError)
		return
	}
	ch, cancel := a.events.Subscribe()
	defer cancel()
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	flusher.Flush()
	enc := json.NewEncoder(w)
	for {
		select {
		case <-r.Context().Done():
			return
		case ev, ok := <-ch:
			if !ok {
				return
			}
			if err := enc.Encode(ev); err != nil {
				return
			}
			flusher.Flush()
		}
	}
}

func sortEndpoints(es []api.Endpoint) {
	sort.Slice(es, func(i, j int) bool {
		if es[i].IP != es[j].IP {
			return es[i].IP.Less(es[j].IP)
		}
		return es[i].Key.String() < es[j].Key.String()
	})
}
