package api

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"time"
)

// Client calls the agent over its Unix socket.
type Client struct {
	socket string
	http   *http.Client
}

// NewClient returns a client for the agent listening on socket. timeout bounds each call
// (0 means none, for streams).
func NewClient(socket string, timeout time.Duration) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
		DisableCompression: true,
	}
	return &Client{socket: socket, http: &http.Client{Transport: tr, Timeout: timeout}}
}

// Socket is the path the client dials.
func (c *Client) Socket() string { return c.socket }

// Allocate asks for an address for one attachment. A repeated request for the same key returns
// the address already allocated to it.
func (c *Client) Allocate(ctx context.Context, req AllocationRequest) (Allocation, error) {
	var a Allocation
	err := c.do(ctx, http.MethodPost, "/v1/ipam/allocations", req, &a)
	return a, err
}

// Release frees the address of one attachment; releasing an unknown key succeeds.
func (c *Client) Release(ctx context.Context, k Key) error {
	return c.do(ctx, http.MethodDelete, keyPath("/v1/ipam/allocations", k), nil, nil)
}

// Pool returns the address pool.
func (c *Client) Pool(ctx context.Context) (PoolState, error) {
	var p PoolState
	err := c.do(ctx, http.MethodGet, "/v1/ipam", nil, &p)
	return p, err
}

// PutEndpoint registers a wired container interface.
func (c *Client) PutEndpoint(ctx context.Context, req EndpointRequest) (Endpoint, error) {
	var e Endpoint
	err := c.do(ctx, http.MethodPut, keyPath("/v1/endpoints", req.Key), req, &e)
	return e, err
}

// GetEndpoint returns one endpoint; an unknown key is an *Error with CodeUnknownContainer.
func (c *Client) GetEndpoint(ctx context.Context, k Key) (Endpoint, error) {
	var e Endpoint
	err := c.do(ctx, http.MethodGet, keyPath("/v1/endpoints", k), nil, &e)
	return e, err
}

// DeleteEndpoint removes an endpoint and releases its address; an unknown key succeeds.
func (c *Client) DeleteEndpoint(ctx context.Context, k Key) error {
	return c.do(ctx, http.MethodDelete, keyPath("/v1/endpoints", k), nil, nil)
}

// Endpoints lists every endpoint with its packet counts.
func (c *Client) Endpoints(ctx context.Context) ([]Endpoint, error) {
	var es []Endpoint
	err := c.do(ctx, http.MethodGet, "/v1/endpoints", nil, &es)
	return es, err
}

// GC releases every attachment not in valid.
func (c *Client) GC(ctx context.Context, valid []Key) (GCResponse, error) {
	var r GCResponse
	err := c.do(ctx, http.MethodPost, "/v1/gc", GCRequest{ValidAttachments: valid}, &r)
	return r, err
}

// Status returns the agent's status.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var s Status
	err := c.do(ctx, http.MethodGet, "/v1/status", nil, &s)
	return s, err
}

// Events streams drop events to fn until ctx ends, the agent closes the stream, or fn fails.
func (c *Client) Events(ctx context.Context, fn func(DropEvent) error) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://agent/v1/events", nil)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return c.unreachable(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return decodeError(resp)
	}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		var ev DropEvent
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			return fmt.Errorf("decode event: %w", err)
		}
		if err := fn(ev); err != nil {
			return err
		}
	}
	if ctx.Err() != nil {
		return nil
	}
	return sc.Err()
}

func keyPath(prefix string, k Key) string {
	return prefix + "/" + url.PathEscape(k.ContainerID) + "/" + url.PathEscape(k.IfName)
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://agent"+path, body)
	if err != nil {
		return err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return c.unreachable(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return decodeError(resp)
	}
	if out == nil || resp.StatusCode == http.StatusNoContent {
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return &Error{Code: CodeDecodingFailure, Msg: "cannot decode the agent's answer to " + method + " " + path, Details: err.Error()}
	}
	return nil
}

// unreachable turns a transport failure into the CNI "try again later" error a runtime retries.
func (c *Client) unreachable(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		err = ue.Err
	}
	return &Error{
		Code:    CodeTryAgainLater,
		Msg:     fmt.Sprintf("vnetbpf agent is not reachable on %s; check that vnetbpf-agent is running on this node", c.socket),
		Details: err.Error(),
	}
}

func decodeError(resp *http.Response) error {
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
	var e Error
	if json.Unmarshal(b, &e) == nil && e.Msg != "" {
		return &e
	}
	return &Error{Code: CodeInternal, Msg: fmt.Sprintf("agent answered %s", resp.Status), Details: string(bytes.TrimSpace(b))}
}
