// Command vnetbpf is the vnetbpf CNI plugin (CNI type "vnetbpf"). The runtime runs it for
// each ADD, DEL, CHECK, STATUS, GC and VERSION; the work is in pkg/cni.
package main

import (
	"runtime"

	"github.com/containernetworking/cni/pkg/skel"

	"github.com/vnetbpf/vnetbpf/pkg/cni"
)

// Namespace switches apply to one OS thread: the main goroutine must stay on the thread
// it starts on, so that ns.Do's switch and switch back land on the same thread.
func init() { runtime.LockOSThread() }

func main() {
	skel.PluginMainFuncs(cni.Funcs(), cni.Versions, cni.About)
}
