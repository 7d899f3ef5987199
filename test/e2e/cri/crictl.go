package cri

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// Crictl sends CRI calls to a runtime the way kubelet does, through crictl.
type Crictl struct {
	Bin      string
	Endpoint string // unix:///path/to/containerd.sock
	// Slow, if set, hears of each call that took over a second: a CRI call that kubelet
	// makes synchronously is worth knowing about when it is slow.
	Slow func(args []string, took time.Duration)
}

// Run runs `crictl args...` against the endpoint and returns its stdout.
func (c *Crictl) Run(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// --timeout bounds each CRI call; crictl's default of 2 s is shorter than a cold
	// RunPodSandbox on a loaded machine.
	argv := append([]string{"--runtime-endpoint", c.Endpoint, "--image-endpoint", c.Endpoint, "--timeout", "30s"}, args...)
	cmd := exec.CommandContext(ctx, c.Bin, argv...)
	// crictl would read /etc/crictl.yaml; an empty config keeps the machine's out of the test.
	cmd.Env = append(os.Environ(), "CRI_CONFIG_FILE=/dev/null")
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	start := time.Now()
	err := cmd.Run()
	if took := time.Since(start); took > time.Second && c.Slow != nil {
		c.Slow(args, took)
	}
	if err != nil {
		return out.String(), fmt.Errorf("crictl %s: %w; stderr: %s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.String(), nil
}

// PodConfig is the part of a CRI PodSandboxConfig the test sets, in crictl's JSON form.
type PodConfig struct {
	Metadata     PodMetadata `json:"metadata"`
	Hostname     string      `json:"hostname,omitempty"`
	LogDirectory string      `json:"log_directory"`
	Linux        PodLinux    `json:"linux"`
}

// PodMetadata names a pod as kubelet does: the CRI plugin passes namespace and name to CNI
// as K8S_POD_NAMESPACE and K8S_POD_NAME.
type PodMetadata struct {
	Name      string `json:"name"`
	Namespace string `json:"namespace"`
	UID       string `json:"uid"`
	Attempt   int    `json:"attempt"`
}

// PodLinux holds the pod's Linux settings.
type PodLinux struct {
	// CgroupParent is where runc puts the pod's cgroups (cgroupfs driver: a path under
	// each hierarchy), as kubelet's kubepods/pod<uid>.
	CgroupParent string `json:"cgroup_parent,omitempty"`
}

// RunPod runs `crictl runp` with cfg, written to dir, and returns the sandbox ID.
func (c *Crictl) RunPod(dir string, cfg PodConfig) (string, error) {
	b, err := json.Marshal(cfg)
	if err != nil {
		return "", err
	}
	path := filepath.Join(dir, "pod-"+cfg.Metadata.Namespace+"-"+cfg.Metadata.Name+".json")
	if err := os.WriteFile(path, b, 0o644); err != nil {
		return "", err
	}
	out, err := c.Run("runp", path)
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(out), nil
}

// PodInspect is the part of `crictl inspectp -o json` the test reads: the CRI
// PodSandboxStatus and, from the verbose info, the sandbox's process and OCI spec.
type PodInspect struct {
	Status struct {
		ID       string      `json:"id"`
		Metadata PodMetadata `json:"metadata"`
		State    string      `json:"state"` // SANDBOX_READY or SANDBOX_NOTREADY
		Network  struct {
			IP string `json:"ip"`
		} `json:"network"`
	} `json:"status"`
	Info struct {
		Pid         int `json:"pid"`
		RuntimeSpec struct {
			Linux struct {
				Namespaces []struct {
					Type string `json:"type"`
					Path string `json:"path"`
				} `json:"namespaces"`
			} `json:"linux"`
		} `json:"runtimeSpec"`
	} `json:"info"`
}

// IP is the pod's address as CRI reports it.
func (p PodInspect) IP() (netip.Addr, error) { return netip.ParseAddr(p.Status.Network.IP) }

// NetnsPath is the pod's network namespace as the sandbox's OCI spec names it.
func (p PodInspect) NetnsPath() string {
	for _, n := range p.Info.RuntimeSpec.Linux.Namespaces {
		if n.Type == "network" {
			return n.Path
		}
	}
	return ""
}

// InspectPod runs `crictl inspectp -o json id`.
func (c *Crictl) InspectPod(id string) (PodInspect, error) {
	var p PodInspect
	out, err := c.Run("inspectp", "-o", "json", id)
	if err != nil {
		return p, err
	}
	if err := json.Unmarshal([]byte(out), &p); err != nil {
		return p, fmt.Errorf("parse crictl inspectp: %w\n%s", err, out)
	}
	return p, nil
}

// PodIDs lists the IDs of the sandboxes the runtime knows, ready or not.
func (c *Crictl) PodIDs() ([]string, error) {
	out, err := c.Run("pods", "-q")
	if err != nil {
		return nil, err
	}
	return strings.Fields(out), nil
}

// RuntimeStatus is the part of `crictl info -o json` that says whether the runtime and its
// network (the CNI config) are ready, as kubelet checks before it runs pods.
type RuntimeStatus struct {
	Status struct {
		Conditions []struct {
			Type    string `json:"type"`
			Status  bool   `json:"status"`
			Reason  string `json:"reason"`
			Message string `json:"message"`
		} `json:"conditions"`
	} `json:"status"`
}

// Ready returns nil when every condition holds, else the ones that do not.
func (s RuntimeStatus) Ready() error {
	var bad []string
	for _, c := range s.Status.Conditions {
		if !c.Status {
			bad = append(bad, fmt.Sprintf("%s: %s %s", c.Type, c.Reason, c.Message))
		}
	}
	if len(s.Status.Conditions) == 0 {
		return fmt.Errorf("no conditions reported")
	}
	if len(bad) > 0 {
		return fmt.Errorf("not ready: %s", strings.Join(bad, "; "))
	}
	return nil
}

// Info runs `crictl info -o json`.
func (c *Crictl) Info() (RuntimeStatus, error) {
	var s RuntimeStatus
	out, err := c.Run("info", "-o", "json")
	if err != nil {
		return s, err
	}
	if err := json.Unmarshal([]byte(out), &s); err != nil {
		return s, fmt.Errorf("parse crictl info: %w", err)
	}
	return s, nil
}

// WaitReady polls `crictl info` until the runtime and network conditions hold.
func (c *Crictl) WaitReady(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		s, err := c.Info()
		if err == nil {
			err = s.Ready()
		}
		if err == nil {
			return nil
		}
		// containerd serves, but without its CRI plugin, which failed to load: no wait helps.
		if strings.Contains(err.Error(), "unknown service runtime.v1.RuntimeService") {
			return fmt.Errorf("containerd runs without its CRI plugin (see its log for why it failed to load): %w", err)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("CRI not ready after %s: %w", timeout, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
