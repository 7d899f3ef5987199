package cni

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"os"
	"reflect"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/plugins/pkg/testutils"

	"github.com/vnetbpf/vnetbpf/pkg/api"
)

// These tests need neither root nor namespaces: they fail before any link is touched.

func TestHostVethNameAndMACs(t *testing.T) {
	k := api.Key{ContainerID: "abc", IfName: "eth0"}
	// Golden values from `echo -n abc/eth0 | sha256sum` and the same with the MAC salts, so
	// a change of the derivation (which would orphan every existing veth on upgrade) fails.
	if got := api.HostVethName(k); got != "vnb538f587a236" {
		t.Errorf("HostVethName = %q, want vnb538f587a236", got)
	}
	if got := api.HostMAC(k).String(); got != "02:e2:23:26:57:f9" {
		t.Errorf("hostMAC = %s, want 02:e2:23:26:57:f9", got)
	}
	if got := api.ContainerMAC(k).String(); got != "ea:95:67:f6:4f:e3" {
		t.Errorf("containerMAC = %s, want ea:95:67:f6:4f:e3", got)
	}
	long := api.Key{ContainerID: strings.Repeat("f", 64), IfName: "net1"}
	if n := api.HostVethName(long); len(n) > 15 || n == api.HostVethName(api.Key{ContainerID: long.ContainerID, IfName: "eth0"}) {
		t.Errorf("api.HostVethName(%v) = %q: longer than 15 bytes or not distinct per ifname", long, n)
	}
	for _, mac := range [][]byte{api.HostMAC(long), api.ContainerMAC(long)} {
		if mac[0]&0x01 != 0 || mac[0]&0x02 == 0 {
			t.Errorf("MAC %x is not a locally administered unicast address", mac)
		}
	}
}

func wantCode(t *testing.T, err error, code uint, contains ...string) *types.Error {
	t.Helper()
	var te *types.Error
	if !errors.As(err, &te) {
		t.Fatalf("want a CNI error with code %d, got %T: %v", code, err, err)
	}
	if te.Code != code {
		t.Fatalf("error code %d (%v), want %d", te.Code, te, code)
	}
	for _, s := range contains {
		if !strings.Contains(te.Error(), s) {
			t.Errorf("error %q does not mention %q", te.Error(), s)
		}
	}
	return te
}

func TestBadConfig(t *testing.T) {
	cases := []struct {
		name, conf string
		code       uint
		mention    string
	}{
		{"mtu too small", `{"cniVersion":"1.1.0","name":"n","type":"vnetbpf","mtu":10}`, 7, "mtu 10"},
		{"mtu not a number", `{"cniVersion":"1.1.0","name":"n","type":"vnetbpf","mtu":"big"}`, 7, "mtu"},
		{"unknown log level", `{"cniVersion":"1.1.0","name":"n","type":"vnetbpf","logLevel":"loud"}`, 7, "logLevel"},
		{"relative socket", `{"cniVersion":"1.1.0","name":"n","type":"vnetbpf","agentSocket":"run/a.sock"}`, 7, "agentSocket"},
		{"relative log file", `{"cniVersion":"1.1.0","name":"n","type":"vnetbpf","logFile":"x.log"}`, 7, "logFile"},
		{"not JSON", `{"cniVersion":`, 6, "JSON"},
	}
	cmds := map[string]func(*skel.CmdArgs) error{"ADD": Add, "DEL": Del, "CHECK": Check, "STATUS": Status, "GC": GC}
	for _, c := range cases {
		for name, cmd := range cmds {
			t.Run(c.name+"/"+name, func(t *testing.T) {
				args := &skel.CmdArgs{ContainerID: "c1", IfName: "eth0", Netns: "/nonexistent", StdinData: []byte(c.conf)}
				wantCode(t, cmd(args), c.code, c.mention)
			})
		}
	}
}

func TestBadEnvironment(t *testing.T) {
	agent := newFakeAgent(t)
	conf := []byte(`{"cniVersion":"1.1.0","name":"n","type":"vnetbpf","agentSocket":"` + agent.socket + `"}`)
	t.Run("no netns", func(t *testing.T) {
		err := Add(&skel.CmdArgs{ContainerID: "c1", IfName: "eth0", StdinData: conf})
		wantCode(t, err, types.ErrInvalidEnvironmentVariables, "CNI_NETNS")
	})
	t.Run("netns path is not a namespace", func(t *testing.T) {
		err := Add(&skel.CmdArgs{ContainerID: "c1", IfName: "eth0", Netns: "/nonexistent/ns", StdinData: conf})
		wantCode(t, err, types.ErrInvalidEnvironmentVariables, "CNI_NETNS", "/nonexistent/ns")
	})
	t.Run("unknown CNI_ARGS without IgnoreUnknown", func(t *testing.T) {
		err := Add(&skel.CmdArgs{ContainerID: "c1", IfName: "eth0", Netns: "/nonexistent/ns", StdinData: conf,
			Args: "K8S_POD_NAMESPACE=a;K8S_POD_NAME=b;FOO=bar"})
		wantCode(t, err, types.ErrInvalidEnvironmentVariables, "CNI_ARGS", "FOO=bar", "IgnoreUnknown")
	})
	if allocs, _, _ := agent.snapshot(); len(allocs) != 0 {
		t.Errorf("a refused ADD allocated %v", allocs)
	}
}

func TestStatus(t *testing.T) {
	agent := newFakeAgent(t)
	status := func(socket string) error {
		conf := []byte(`{"cniVersion":"1.1.0","name":"n","type":"vnetbpf","agentSocket":"` + socket + `"}`)
		return testutils.CmdStatus(func() error { return Status(&skel.CmdArgs{StdinData: conf}) })
	}
	if err := status(agent.socket); err != nil {
		t.Fatalf("STATUS with an agent that can allocate: %v", err)
	}
	agent.set(func(f *fakeAgent) { f.status = api.Status{Ready: true, Reason: "pool empty: 0 of 16 addresses free"} })
	wantCode(t, status(agent.socket), types.ErrPluginNotAvailable, "pool empty: 0 of 16 addresses free")

	agent.set(func(f *fakeAgent) { f.status = api.Status{Reason: "loading bpf objects"} })
	wantCode(t, status(agent.socket), types.ErrPluginNotAvailable, "not ready", agent.socket)

	missing := agent.socket + ".gone"
	wantCode(t, status(missing), types.ErrPluginNotAvailable, missing)
}

func TestGC(t *testing.T) {
	agent := newFakeAgent(t)
	client := api.NewClient(agent.socket, 0)
	keep := api.Key{ContainerID: "keep", IfName: "eth0"}
	stale := api.Key{ContainerID: "stale", IfName: "eth0"}
	for _, k := range []api.Key{keep, stale} {
		if _, err := client.Allocate(t.Context(), api.AllocationRequest{Owner: api.Owner{Key: k}}); err != nil {
			t.Fatal(err)
		}
	}
	base := `{"cniVersion":"1.1.0","name":"n","type":"vnetbpf","agentSocket":"` + agent.socket + `"`

	err := GC(&skel.CmdArgs{StdinData: []byte(base + `}`)})
	wantCode(t, err, types.ErrInvalidNetworkConfig, "cni.dev/valid-attachments")
	if allocs, _, _ := agent.snapshot(); len(allocs) != 2 {
		t.Fatalf("GC without valid-attachments released addresses: %v left", allocs)
	}

	conf := base + `,"cni.dev/valid-attachments":[{"containerID":"keep","ifname":"eth0"}]}`
	if err := GC(&skel.CmdArgs{StdinData: []byte(conf)}); err != nil {
		t.Fatalf("GC: %v", err)
	}
	allocs, _, released := agent.snapshot()
	var gcValid [][]api.Key
	agent.set(func(f *fakeAgent) { gcValid = f.gcValid })
	if !reflect.DeepEqual(gcValid, [][]api.Key{{keep}}) {
		t.Errorf("agent got valid attachments %v, want [[%v]]", gcValid, keep)
	}
	if _, ok := allocs[keep]; !ok || !reflect.DeepEqual(released, []api.Key{stale}) {
		t.Errorf("after GC: allocations %v, released %v; want %v kept and %v released", allocs, released, keep, stale)
	}

	agent.stop()
	wantCode(t, GC(&skel.CmdArgs{StdinData: []byte(conf)}), types.ErrTryAgainLater, agent.socket)
}

// runSkel runs the plugin's main as the binary would, with the given environment and
// stdin, and returns what it printed on stdout.
func runSkel(t *testing.T, env map[string]string, stdin string) ([]byte, *types.Error) {
	t.Helper()
	for k, v := range env {
		t.Setenv(k, v)
	}
	inR, inW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	go func() { io.WriteString(inW, stdin); inW.Close() }()
	oldIn, oldOut := os.Stdin, os.Stdout
	os.Stdin, os.Stdout = inR, outW
	cniErr := skel.PluginMainFuncsWithError(Funcs(), Versions, About)
	os.Stdin, os.Stdout = oldIn, oldOut
	outW.Close()
	out, _ := io.ReadAll(outR)
	return out, cniErr
}

func TestVersions(t *testing.T) {
	out, cniErr := runSkel(t, map[string]string{"CNI_COMMAND": "VERSION"}, "")
	if cniErr != nil {
		t.Fatal(cniErr)
	}
	var info struct {
		SupportedVersions []string `json:"supportedVersions"`
	}
	if err := json.Unmarshal(out, &info); err != nil {
		t.Fatalf("VERSION printed %q: %v", out, err)
	}
	want := []string{"0.3.1", "0.4.0", "1.0.0", "1.1.0"}
	if !reflect.DeepEqual(info.SupportedVersions, want) {
		t.Errorf("VERSION lists %v, want %v", info.SupportedVersions, want)
	}

	// A config in a version the plugin does not speak is refused before anything happens.
	env := map[string]string{"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/nonexistent", "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin"}
	out, cniErr = runSkel(t, env, `{"cniVersion":"0.2.0","name":"n","type":"vnetbpf"}`)
	if cniErr == nil || cniErr.Code != types.ErrIncompatibleCNIVersion {
		t.Errorf("ADD with cniVersion 0.2.0: error %v, want code 1 (output %q)", cniErr, out)
	}
	if bytes.Contains(out, []byte("ips")) {
		t.Errorf("ADD with cniVersion 0.2.0 printed a result: %s", out)
	}
}
