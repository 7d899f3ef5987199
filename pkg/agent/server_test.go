package agent

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"

	cniutils "github.com/containernetworking/cni/pkg/utils"

	"github.com/vnetbpf/vnetbpf/pkg/api"
)

// A 64-hex container ID as containerd and CRI-O give them.
const criID = "3f9c1b7e2a4d5c6b7a8e9f0d1c2b3a4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1"

var validContainerIDs = []string{
	criID,
	"a",
	"0",
	"web-0",
	"pod_1.infra",
	"A.B-C_d",
	strings.Repeat("a", 1024), // the agent's upper bound
}

var invalidContainerIDs = []string{
	"",
	"a/b",
	"/abs",
	"../etc",
	"-leading-dash",
	"_leading-underscore",
	".leading-dot",
	"..",
	"has space",
	"tab\there",
	"trailing-newline\n",
	"colon:inside",
	"ünïcödé",
	strings.Repeat("a", 1025),
}

var validIfNames = []string{
	"eth0",
	"net1",
	"e",
	"eth0.100", // dots inside are fine
	"...",      // only "." and ".." are reserved
	"veth-a_b",
	"abcdefghijklmno", // 15 bytes: IFNAMSIZ-1
}

var invalidIfNames = []string{
	"",
	".",
	"..",
	"abcdefghijklmnop", // 16 bytes
	"ethé12345678901",  // 15 characters but 16 bytes
	"eth/0",
	"/",
	"eth:0",
	"eth 0",
	" eth0",
	"eth0\t",
	"eth\n0",
}

// apiErr reads the error body of an answer and checks it is the one every client relies on:
// JSON with a CNI code and a message.
func apiErr(t *testing.T, res *http.Response) api.Error {
	t.Helper()
	if ct := res.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type %q, want application/json", ct)
	}
	var e api.Error
	if err := json.NewDecoder(res.Body).Decode(&e); err != nil {
		t.Fatalf("error body is not an api.Error: %v", err)
	}
	if e.Msg == "" {
		t.Errorf("error body %+v has no message", e)
	}
	return e
}

func TestValidateKey(t *testing.T) {
	for _, id := range validContainerIDs {
		for _, ifn := range validIfNames {
			if aerr := validateKey(api.Key{ContainerID: id, IfName: ifn}); aerr != nil {
				t.Errorf("validateKey(%.20q, %q) = %v, want it accepted", id, ifn, aerr)
			}
		}
	}
	for _, id := range invalidContainerIDs {
		aerr := validateKey(api.Key{ContainerID: id, IfName: "eth0"})
		if aerr == nil {
			t.Errorf("validateKey accepted container ID %.40q", id)
			continue
		}
		if aerr.status != http.StatusBadRequest || aerr.body.Code != api.CodeInvalidEnvironment {
			t.Errorf("validateKey(container ID %.40q) = HTTP %d code %d, want 400 and %d", id, aerr.status, aerr.body.Code, api.CodeInvalidEnvironment)
		}
		if !strings.HasPrefix(aerr.body.Msg, "container ID ") {
			t.Errorf("validateKey(container ID %.40q) = %q, want a message about the container ID", id, aerr.body.Msg)
		}
	}
	for _, ifn := range invalidIfNames {
		aerr := validateKey(api.Key{ContainerID: criID, IfName: ifn})
		if aerr == nil {
			t.Errorf("validateKey accepted interface name %q", ifn)
			continue
		}
		if aerr.status != http.StatusBadRequest || aerr.body.Code != api.CodeInvalidEnvironment {
			t.Errorf("validateKey(ifname %q) = HTTP %d code %d, want 400 and %d", ifn, aerr.status, aerr.body.Code, api.CodeInvalidEnvironment)
		}
		if !strings.HasPrefix(aerr.body.Msg, "interface name ") {
			t.Errorf("validateKey(ifname %q) = %q, want a message about the interface name", ifn, aerr.body.Msg)
		}
	}
}

// TestValidateKeyAgreesWithCNI compares validateKey with the CNI library's own checks of
// CNI_CONTAINERID and CNI_IFNAME, which skel applies before the plugin runs: an attachment
// the runtime can create must be one the agent accepts, and the agent must refuse what the
// spec refuses. The agent's 1024-byte bound on container IDs is its own and not compared.
//
// White space of every kind is refused, as the CNI checks unicode.IsSpace and the kernel's
// dev_valid_name checks isspace.
func TestValidateKeyAgreesWithCNI(t *testing.T) {
	ifNames := append(append([]string{}, validIfNames...), invalidIfNames...)
	ifNames = append(ifNames, "eth\r0", "eth\v0", "eth\f0", "eth\u00a00", "eth\u20030", "eth\u00850")
	for _, ifn := range ifNames {
		agentOK := validateKey(api.Key{ContainerID: criID, IfName: ifn}) == nil
		cniOK := cniutils.ValidateInterfaceName(ifn) == nil
		if agentOK != cniOK {
			t.Errorf("interface name %q: agent accepts=%v, CNI accepts=%v", ifn, agentOK, cniOK)
		}
	}
	for _, id := range append(append([]string{}, validContainerIDs...), invalidContainerIDs...) {
		if len(id) > 1024 {
			continue
		}
		agentOK := validateKey(api.Key{ContainerID: id, IfName: "eth0"}) == nil
		cniOK := cniutils.ValidateContainerID(id) == nil
		if agentOK != cniOK {
			t.Errorf("container ID %.40q: agent accepts=%v, CNI accepts=%v", id, agentOK, cniOK)
		}
	}
}

// keyRoutes serves the routes whose path carries a key, with the agent's real handlers on
// an agent that holds nothing: a request that passes validation reaches an empty agent and
// gets "not found", one that does not is answered 400 before any state is touched (a nil
// pool would panic and fail the request).
func keyRoutes(t *testing.T) *httptest.Server {
	t.Helper()
	a := &Agent{endpoints: make(map[api.Key]api.Endpoint)}
	mux := http.NewServeMux()
	mux.Handle("GET /v1/endpoints/{containerID}/{ifName}", jsonHandler(a.handleGetEndpoint))
	mux.Handle("PUT /v1/endpoints/{containerID}/{ifName}", jsonHandler(a.handlePutEndpoint))
	mux.Handle("DELETE /v1/endpoints/{containerID}/{ifName}", jsonHandler(a.handleRelease))
	mux.Handle("DELETE /v1/ipam/allocations/{containerID}/{ifName}", jsonHandler(a.handleRelease))
	mux.Handle("POST /v1/ipam/allocations", jsonHandler(a.handleAllocate))
	mux.Handle("POST /v1/gc", jsonHandler(a.handleGC))
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return srv
}

func do(t *testing.T, method, url, body string) *http.Response {
	t.Helper()
	var r io.Reader
	if body != "" {
		r = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, url, r)
	if err != nil {
		t.Fatal(err)
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	t.Cleanup(func() { res.Body.Close() })
	return res
}

// TestPathKeyValidation sends keys the way api.Client does (each part path-escaped), so that
// a '/' or a space inside a container ID or interface name reaches validateKey intact.
func TestPathKeyValidation(t *testing.T) {
	srv := keyRoutes(t)
	path := func(prefix, id, ifn string) string {
		return srv.URL + prefix + "/" + url.PathEscape(id) + "/" + url.PathEscape(ifn)
	}

	t.Run("valid key passes validation", func(t *testing.T) {
		res := do(t, http.MethodGet, path("/v1/endpoints", criID, "eth0"), "")
		if res.StatusCode != http.StatusNotFound {
			t.Fatalf("GET a valid, unknown key: HTTP %d, want 404", res.StatusCode)
		}
		if e := apiErr(t, res); e.Code != api.CodeUnknownContainer {
			t.Errorf("GET a valid, unknown key: code %d (%s), want %d", e.Code, e.Msg, api.CodeUnknownContainer)
		}
	})

	bad := []struct{ name, id, ifn, inMsg string }{
		{"container ID with /", "abc/def", "eth0", `container ID "abc/def" is invalid`},
		{"container ID with space", "abc def", "eth0", `container ID "abc def" is invalid`},
		{"container ID starting with .", ".hidden", "eth0", `container ID ".hidden" is invalid`},
		{"ifname of 16 bytes", criID, "abcdefghijklmnop", `interface name "abcdefghijklmnop" is invalid`},
		{"ifname with /", criID, "eth/0", `interface name "eth/0" is invalid`},
		{"ifname with space", criID, "eth 0", `interface name "eth 0" is invalid`},
		{"ifname with :", criID, "eth:0", `interface name "eth:0" is invalid`},
	}
	for _, route := range []struct{ method, prefix, body string }{
		{http.MethodGet, "/v1/endpoints", ""},
		{http.MethodPut, "/v1/endpoints", "{}"},
		{http.MethodDelete, "/v1/endpoints", ""},
		{http.MethodDelete, "/v1/ipam/allocations", ""},
	} {
		for _, tc := range bad {
			t.Run(route.method+" "+route.prefix+" "+tc.name, func(t *testing.T) {
				res := do(t, route.method, path(route.prefix, tc.id, tc.ifn), route.body)
				if res.StatusCode != http.StatusBadRequest {
					t.Fatalf("HTTP %d, want 400", res.StatusCode)
				}
				e := apiErr(t, res)
				if e.Code != api.CodeInvalidEnvironment || !strings.Contains(e.Msg, tc.inMsg) {
					t.Errorf("answer code %d %q, want code %d and a message containing %q", e.Code, e.Msg, api.CodeInvalidEnvironment, tc.inMsg)
				}
			})
		}
	}
}

// TestBodyKeyValidation: keys in request bodies get the same checks as keys in paths.
func TestBodyKeyValidation(t *testing.T) {
	srv := keyRoutes(t)
	for _, tc := range []struct {
		name, path, body, inMsg string
		code                    uint
	}{
		{"allocation with empty container ID", "/v1/ipam/allocations",
			`{"containerID":"","ifName":"eth0"}`, `container ID "" is invalid`, api.CodeInvalidEnvironment},
		{"allocation with ifname ..", "/v1/ipam/allocations",
			`{"containerID":"` + criID + `","ifName":".."}`, `interface name ".." is invalid`, api.CodeInvalidEnvironment},
		{"allocation with long ifname", "/v1/ipam/allocations",
			`{"containerID":"` + criID + `","ifName":"abcdefghijklmnop"}`, `interface name "abcdefghijklmnop"`, api.CodeInvalidEnvironment},
		{"allocation with a netns that is not one", "/v1/ipam/allocations",
			`{"containerID":"` + criID + `","ifName":"eth0","netns":"/nonexistent/netns"}`, `netns "/nonexistent/netns" is not a network namespace`, api.CodeInvalidEnvironment},
		{"gc with a bad key among good ones", "/v1/gc",
			`{"validAttachments":[{"containerID":"` + criID + `","ifName":"eth0"},{"containerID":"a/b","ifName":"eth0"}]}`, `container ID "a/b" is invalid`, api.CodeInvalidEnvironment},
		{"gc with ifname .", "/v1/gc",
			`{"validAttachments":[{"containerID":"` + criID + `","ifName":"."}]}`, `interface name "." is invalid`, api.CodeInvalidEnvironment},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res := do(t, http.MethodPost, srv.URL+tc.path, tc.body)
			if res.StatusCode != http.StatusBadRequest {
				t.Fatalf("HTTP %d, want 400", res.StatusCode)
			}
			e := apiErr(t, res)
			if e.Code != tc.code || !strings.Contains(e.Msg, tc.inMsg) {
				t.Errorf("answer code %d %q, want code %d and a message containing %q", e.Code, e.Msg, tc.code, tc.inMsg)
			}
		})
	}
}

// TestPutEndpointKeyMismatch: the key in the body must be the key in the path, so that a
// confused client cannot register one attachment under another's name.
func TestPutEndpointKeyMismatch(t *testing.T) {
	srv := keyRoutes(t)
	body := `{"containerID":"other","ifName":"eth0","ip":"10.1.0.10","hostIfName":"vnb0","hostIfIndex":3,"hostMAC":"02:00:00:00:00:01","containerMAC":"02:00:00:00:00:02"}`
	res := do(t, http.MethodPut, srv.URL+"/v1/endpoints/"+criID+"/eth0", body)
	if res.StatusCode != http.StatusBadRequest {
		t.Fatalf("HTTP %d, want 400", res.StatusCode)
	}
	if e := apiErr(t, res); e.Code != api.CodeInvalidConfig || !strings.Contains(e.Msg, "does not match path key") {
		t.Errorf("answer code %d %q, want code %d and 'does not match path key'", e.Code, e.Msg, api.CodeInvalidConfig)
	}
}

func decodeBody(t *testing.T, body string) (api.GCRequest, *apiError) {
	t.Helper()
	req := httptest.NewRequest(http.MethodPost, "/v1/gc", strings.NewReader(body))
	var v api.GCRequest
	aerr := decode(req, &v)
	return v, aerr
}

func TestDecodeAccepts(t *testing.T) {
	for _, body := range []string{
		`{"validAttachments":[{"containerID":"a","ifName":"eth0"}]}`,
		`  {"validAttachments":[{"containerID":"a","ifName":"eth0"}]}` + "\n", // what json.Encoder sends
		"{\"validAttachments\":[{\"containerID\":\"a\",\"ifName\":\"eth0\"}]}\r\n\t ",
	} {
		v, aerr := decodeBody(t, body)
		if aerr != nil {
			t.Errorf("decode(%q) = %v, want it accepted", body, aerr)
			continue
		}
		if want := []api.Key{{ContainerID: "a", IfName: "eth0"}}; len(v.ValidAttachments) != 1 || v.ValidAttachments[0] != want[0] {
			t.Errorf("decode(%q) = %+v, want %+v", body, v.ValidAttachments, want)
		}
	}
}

func TestDecodeRejects(t *testing.T) {
	for _, tc := range []struct {
		name, body, inMsg string
	}{
		{"empty body", "", "invalid request body: EOF"},
		{"not JSON", "containerID=a", "invalid request body"},
		{"truncated", `{"validAttachments":[`, "invalid request body"},
		{"wrong type", `{"validAttachments":"all"}`, "invalid request body"},
		{"unknown field", `{"validAttachments":[],"dryRun":true}`, `unknown field "dryRun"`},
		{"unknown nested field", `{"validAttachments":[{"containerID":"a","ifName":"eth0","podName":"x"}]}`, `unknown field "podName"`},
		{"misspelt field", `{"validAtachments":[]}`, `unknown field "validAtachments"`},
		{"second object", `{"validAttachments":[]}{"validAttachments":[]}`, "trailing data"},
		{"second object after a newline", "{\"validAttachments\":[]}\n{}", "trailing data"},
		{"trailing garbage", `{"validAttachments":[]} x`, "trailing data"},
		{"trailing number", `{"validAttachments":[]} 1`, "trailing data"},
		{"over 1 MiB", `{"validAttachments":[{"containerID":"` + strings.Repeat("a", 1<<20) + `","ifName":"eth0"}]}`, "invalid request body"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v, aerr := decodeBody(t, tc.body)
			if aerr == nil {
				t.Fatalf("decode(%.60q) accepted it: %+v", tc.body, v)
			}
			if aerr.status != http.StatusBadRequest || aerr.body.Code != api.CodeDecodingFailure {
				t.Errorf("decode(%.60q) = HTTP %d code %d, want 400 and %d (decoding failure)", tc.body, aerr.status, aerr.body.Code, api.CodeDecodingFailure)
			}
			if !strings.Contains(aerr.body.Msg, tc.inMsg) {
				t.Errorf("decode(%.60q) = %q, want a message containing %q", tc.body, aerr.body.Msg, tc.inMsg)
			}
		})
	}
}

// TestDecodeRejectsStrayClosingBracket: json.Decoder.More reports false before ']' and '}',
// so decode must look for trailing data with another Decode.
func TestDecodeRejectsStrayClosingBracket(t *testing.T) {
	for _, body := range []string{`{"validAttachments":[]}}`, `{"validAttachments":[]}]`} {
		if _, aerr := decodeBody(t, body); aerr == nil || aerr.body.Code != api.CodeDecodingFailure {
			t.Errorf("decode(%q) = %v, want code %d for the stray bracket", body, aerr, api.CodeDecodingFailure)
		}
	}
}

// TestDecodeThroughHandlers: every route with a body answers a bad one with code 6 as JSON,
// before it touches the agent's state.
func TestDecodeThroughHandlers(t *testing.T) {
	srv := keyRoutes(t)
	for _, tc := range []struct{ method, path string }{
		{http.MethodPost, "/v1/ipam/allocations"},
		{http.MethodPut, "/v1/endpoints/" + criID + "/eth0"},
		{http.MethodPost, "/v1/gc"},
	} {
		for name, body := range map[string]string{
			"bad JSON":      `{"containerID":`,
			"unknown field": `{"containerID":"a","ifName":"eth0","color":"blue"}`,
			"trailing data": `{"containerID":"a","ifName":"eth0"} {}`,
		} {
			t.Run(tc.method+" "+tc.path+" "+name, func(t *testing.T) {
				res := do(t, tc.method, srv.URL+tc.path, body)
				if res.StatusCode != http.StatusBadRequest {
					t.Fatalf("HTTP %d, want 400", res.StatusCode)
				}
				if e := apiErr(t, res); e.Code != api.CodeDecodingFailure || !strings.HasPrefix(e.Msg, "invalid request body") {
					t.Errorf("answer code %d %q, want code %d and 'invalid request body: ...'", e.Code, e.Msg, api.CodeDecodingFailure)
				}
			})
		}
	}
}
