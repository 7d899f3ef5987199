package traffic

import (
	"os"
	"testing"
)

func TestQPerfValues(t *testing.T) {
	out := []byte(`udp_bw:
    send_bw     =     25.2 MB/sec
    recv_bw     =     13.9 MB/sec
    msg_rate    =      217 K/sec
    msg_size    =       64 bytes
    time        =        2 sec
    send_msgs   =  788,814 
    recv_msgs   =  434,985 
`)
	v := qperfValues(out)
	for k, want := range map[string]float64{"send_msgs": 788814, "recv_msgs": 434985, "msg_rate": 217000, "msg_size": 64, "send_bw": 25.2} {
		if v[k] != want {
			t.Errorf("%s = %v, want %v", k, v[k], want)
		}
	}
	if _, ok := v["udp_bw:"]; ok {
		t.Error("the test name line parsed as a value")
	}
}

func TestRuntimeSecondsCountsOurOwnCPU(t *testing.T) {
	before, err := runtimeSeconds(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	x := 0
	for i := range 50_000_000 {
		x += i
	}
	after, err := runtimeSeconds(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if after <= before {
		t.Errorf("runtime did not grow across a busy loop (%v -> %v, %d)", before, after, x)
	}
	if s, _ := runtimeSeconds(0); s != 0 {
		t.Errorf("pid 0 (no ksoftirqd found) counts %v s", s)
	}
}

func TestMachineBusyIsPlausible(t *testing.T) {
	b, err := MachineBusy()
	if err != nil {
		t.Fatal(err)
	}
	if b <= 0 {
		t.Errorf("machine busy %v s since boot", b)
	}
}

func TestChildrenSecondsAndHasChildren(t *testing.T) {
	if _, err := childrenSeconds(os.Getpid()); err != nil {
		t.Fatal(err)
	}
	if hasChildren(os.Getpid()) {
		t.Error("the test process has a child before starting one")
	}
}
