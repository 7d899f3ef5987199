package agent

import (
	"bytes"
	"net/http/httptest"
	"testing"

	"github.com/vnetbpf/vnetbpf/pkg/api"
)

// FuzzAPIRequest feeds request bodies to the decoding and validation every mutating route
// runs before it touches state: a body is either refused with a CNI code, or yields keys that
// satisfy the CNI rules (container ID characters, interface names of at most 15 bytes
// without '/').
func FuzzAPIRequest(f *testing.F) {
	for _, s := range []string{
		`{"containerID":"abc","ifName":"eth0","podNamespace":"default","podName":"web"}`,
		`{"containerID":"abc","ifName":"eth0","ip":"10.0.0.5","hostIfName":"vnb0123456789a","hostIfIndex":7,"hostMAC":"02:00:00:00:00:01","containerMAC":"02:00:00:00:00:02"}`,
		`{"validAttachments":[{"containerID":"a","ifName":"eth0"}]}`,
		`{"containerID":"../x","ifName":"eth0/evil"}`,
		`{"containerID":"a","ifName":"0123456789abcdef"}`,
		`{"containerID":"a","ifName":"eth0","netns":"/proc/self/ns/net"}`,
		`{"unknown":1}`, `{} {}`, `[`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		check := func(keys ...api.Key) {
			for _, k := range keys {
				if aerr := validateKey(k); aerr != nil {
					continue
				}
				if len(k.IfName) > 15 || bytes.ContainsAny([]byte(k.IfName), "/ \t\n:") || k.IfName == "." || k.IfName == ".." ||
					k.ContainerID == "" || !containerIDRE.MatchString(k.ContainerID) {
					t.Fatalf("accepted key %q", k)
				}
			}
		}
		var alloc api.AllocationRequest
		if aerr := decode(httptest.NewRequest("POST", "/", bytes.NewReader(body)), &alloc); aerr == nil {
			check(alloc.Key)
		} else if aerr.body.Code != api.CodeDecodingFailure {
			t.Fatalf("decode error with code %d", aerr.body.Code)
		}
		var ep api.EndpointRequest
		if aerr := decode(httptest.NewRequest("PUT", "/", bytes.NewReader(body)), &ep); aerr == nil {
			check(ep.Key)
		}
		var gc api.GCRequest
		if aerr := decode(httptest.NewRequest("POST", "/", bytes.NewReader(body)), &gc); aerr == nil {
			check(gc.ValidAttachments...)
		}
	})
}
