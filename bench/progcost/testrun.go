package progcost

import (
	"errors"
	"fmt"
	"runtime"
	"unsafe"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// progTestRunAttr is the BPF_PROG_TEST_RUN member of union bpf_attr (linux/bpf.h).
type progTestRunAttr struct {
	progFD      uint32
	retval      uint32
	dataSizeIn  uint32
	dataSizeOut uint32
	dataIn      uint64
	dataOut     uint64
	repeat      uint32
	duration    uint32
	ctxSizeIn   uint32
	ctxSizeOut  uint32
	ctxIn       uint64
	ctxOut      uint64
	flags       uint32
	cpu         uint32
	batchSize   uint32
	_           uint32
}

const bpfProgTestRun = 10 // BPF_PROG_TEST_RUN

// errInterrupted means a signal cut a run short: the kernel ran the program an unknown
// number of times, so the call's duration is discarded.
var errInterrupted = errors.New("test run interrupted by a signal")

// testRun runs prog repeat times on one skb built from data and ctx, and returns the verdict
// of the last run and the kernel's time per run in nanoseconds. That time covers the
// kernel's run loop only (local_bh_disable, the program, local_bh_enable, the loop check):
// not the syscall, the skb allocation or the copies. The kernel divides in integers, so it is
// rounded down to a whole nanosecond.
//
// ebpf.Program.Run discards the duration and Program.Benchmark takes no context (the
// __sk_buff that carries ifindex), hence the raw syscall.
func testRun(prog *ebpf.Program, data, ctx []byte, repeat uint32) (verdict uint32, ns uint32, err error) {
	attr := progTestRunAttr{
		progFD:     uint32(prog.FD()),
		dataSizeIn: uint32(len(data)),
		dataIn:     uint64(uintptr(unsafe.Pointer(&data[0]))),
		repeat:     repeat,
	}
	if len(ctx) > 0 {
		attr.ctxSizeIn = uint32(len(ctx))
		attr.ctxIn = uint64(uintptr(unsafe.Pointer(&ctx[0])))
	}
	_, _, errno := unix.Syscall(unix.SYS_BPF, bpfProgTestRun, uintptr(unsafe.Pointer(&attr)), unsafe.Sizeof(attr))
	runtime.KeepAlive(data)
	runtime.KeepAlive(ctx)
	switch {
	case errno == unix.EINTR:
		return 0, 0, errInterrupted
	case errno != 0:
		return 0, 0, fmt.Errorf("BPF_PROG_TEST_RUN: %w", errno)
	}
	return attr.retval, attr.duration, nil
}
