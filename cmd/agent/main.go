// Command vnetbpf-agent is vnetbpf's node daemon (`run`) and the debugging tools that talk to
// it over its socket (`status`, `endpoints list`, `ipam show`, `monitor`).
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/vnetbpf/vnetbpf/pkg/agent"
	"github.com/vnetbpf/vnetbpf/pkg/api"
	"github.com/vnetbpf/vnetbpf/pkg/loader"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := rootCmd().ExecuteContext(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "vnetbpf-agent:", err)
		os.Exit(1)
	}
}

func rootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:           "vnetbpf-agent",
		Short:         "vnetbpf node agent: VNet addresses for containers, forwarded by eBPF",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	var socket string
	root.PersistentFlags().StringVar(&socket, "socket", api.DefaultSocket, "the agent's API socket")
	client := func() *api.Client { return api.NewClient(socket, 10*time.Second) }
	var output string
	addOutput := func(c *cobra.Command) {
		c.Flags().StringVarP(&output, "output", "o", "table", "output format: table or json")
	}

	status := &cobra.Command{
		Use:   "status",
		Short: "Show whether the agent is ready and can give addresses",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			s, err := client().Status(cmd.Context())
			if err != nil {
				return err
			}
			if output == "json" {
				return printJSON(cmd.OutOrStdout(), s)
			}
			w := table(cmd.OutOrStdout())
			fmt.Fprintf(w, "Version:\t%s\nReady:\t%v\nNIC:\t%s\nAttach mode:\t%s (NIC), %s (endpoints)%s\nEndpoints:\t%d\n", s.Version, s.Ready, s.NIC, s.AttachMode, s.EndpointAttachMode, onClsBPF(s), s.Endpoints)
			fmt.Fprintf(w, "Pool (%s):\t%d addresses, %d allocated, %d free, %d cooling\n", s.Pool.Provider, s.Pool.Size, s.Pool.Used, s.Pool.Free, s.Pool.Cooling)
			if s.CanAllocate {
				fmt.Fprintf(w, "Can allocate:\tyes\n")
			} else {
				fmt.Fprintf(w, "Can allocate:\tno: %s\n", s.Reason)
			}
			if s.Pool.LastError != "" {
				fmt.Fprintf(w, "Last provider error:\t%s (%s)\n", s.Pool.LastError, s.Pool.LastErrorTime.Local().Format(time.RFC3339))
			}
			fmt.Fprintf(w, "Started:\t%s\n", s.StartedAt.Local().Format(time.RFC3339))
			return w.Flush()
		},
	}
	addOutput(status)

	endpoints := &cobra.Command{Use: "endpoints", Short: "Container interfaces on this node"}
	list := &cobra.Command{
		Use:   "list",
		Short: "List endpoints with their addresses, veths, MACs and packet counts",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			es, err := client().Endpoints(cmd.Context())
			if err != nil {
				return err
			}
			if output == "json" {
				return printJSON(cmd.OutOrStdout(), es)
			}
			w := table(cmd.OutOrStdout())
			fmt.Fprintln(w, "CONTAINER\tIFNAME\tPOD\tIP\tHOST VETH\tCONTAINER MAC\tHOST MAC\tRX PKTS\tTX PKTS")
			for _, e := range es {
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\n", short(e.ContainerID), e.IfName, pod(e.Owner),
					e.IP, e.HostIfName, e.ContainerMAC, e.HostMAC, e.RxPackets, e.TxPackets)
			}
			return w.Flush()
		},
	}
	addOutput(list)
	endpoints.AddCommand(list)

	ipamCmd := &cobra.Command{Use: "ipam", Short: "The node's address pool"}
	show := &cobra.Command{
		Use:   "show",
		Short: "Show every address of the pool: free, allocated (to whom) or cooling down",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			p, err := client().Pool(cmd.Context())
			if err != nil {
				return err
			}
			if output == "json" {
				return printJSON(cmd.OutOrStdout(), p)
			}
			w := table(cmd.OutOrStdout())
			fmt.Fprintf(w, "provider %s: %d addresses, %d allocated, %d free, %d cooling\n", p.Provider, p.Size, p.Used, p.Free, p.Cooling)
			if p.IPConfigs > 0 || p.Pending > 0 {
				fmt.Fprintf(w, "NIC: %d IP configurations, %d being added\n", p.IPConfigs, p.Pending)
			}
			if p.LastError != "" {
				fmt.Fprintf(w, "last provider error (%s): %s\n", p.LastErrorTime.Local().Format(time.RFC3339), p.LastError)
			}
			fmt.Fprintln(w)
			fmt.Fprintln(w, "IP\tSTATE\tCONTAINER\tIFNAME\tPOD\tUNTIL")
			for _, a := range p.Addresses {
				var cid, ifn, po, until string
				if a.Owner != nil {
					cid, ifn, po = short(a.Owner.ContainerID), a.Owner.IfName, pod(*a.Owner)
				}
				if !a.CoolingUntil.IsZero() {
					until = a.CoolingUntil.Local().Format(time.TimeOnly)
				}
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\n", a.IP, a.State, cid, ifn, po, until)
			}
			return w.Flush()
		},
	}
	addOutput(show)
	ipamCmd.AddCommand(show)

	monitor := &cobra.Command{
		Use:   "monitor",
		Short: "Stream packets the datapath drops, one line each, until interrupted",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			out := cmd.OutOrStdout()
			fmt.Fprintf(os.Stderr, "listening for drop events on %s (Ctrl-C to stop)\n", socket)
			return api.NewClient(socket, 0).Events(cmd.Context(), func(ev api.DropEvent) error {
				if output == "json" {
					return json.NewEncoder(out).Encode(ev)
				}
				_, err := fmt.Fprintln(out, formatEvent(ev))
				return err
			})
		},
	}
	monitor.Flags().StringVarP(&output, "output", "o", "text", "output format: text or json")

	version := &cobra.Command{
		Use:   "version",
		Short: "Print the version",
		Args:  cobra.NoArgs,
		Run:   func(cmd *cobra.Command, _ []string) { fmt.Fprintln(cmd.OutOrStdout(), agent.Version) },
	}

	root.AddCommand(runCmd(), status, endpoints, ipamCmd, monitor, version, installCNICmd(), uninstallCmd())
	return root
}

func runCmd() *cobra.Command {
	var configFile string
	cmd := &cobra.Command{
		Use:   "run",
		Short: "Run the node agent: load the datapath, serve the CNI API and metrics",
		Long: `Run loads and pins the eBPF datapath, attaches it to the NIC, restores and reconciles
its state, and serves the CNI API on a Unix socket until SIGTERM. Stopping the agent never
stops the datapath: containers keep forwarding. Flags override the config file.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := agent.LoadConfig(configFile, cmd.Flags().Changed("config"))
			if err != nil {
				return err
			}
			if err := applyFlags(cmd, &cfg); err != nil {
				return err
			}
			log, err := newLogger(cfg)
			if err != nil {
				return err
			}
			a, err := agent.New(cfg, log)
			if err != nil {
				return err
			}
			if err := a.Run(cmd.Context()); err != nil {
				log.Error("agent failed", "err", err)
				return err
			}
			return nil
		},
	}
	cmd.Flags().StringVarP(&configFile, "config", "c", agent.DefaultConfigFile, "configuration file (YAML)")
	d := agent.DefaultConfig()
	f := cmd.Flags()
	f.String("nic", d.NIC, "host interface on the VNet")
	f.String("bpf-root", d.BPFRoot, "bpffs directory for the pinned maps and links")
	f.String("attach-mode", string(d.AttachMode), "auto, tcx or tc")
	f.String("state-dir", d.StateDir, "directory of the agent's state")
	f.String("metrics-addr", d.MetricsAddr, "address of /metrics, /healthz and /readyz (empty: off)")
	f.StringSlice("vnet-cidrs", nil, "VNet prefixes reached through the NIC (comma-separated)")
	f.StringSlice("static-addresses", nil, "addresses or CIDRs of the static pool (comma-separated)")
	f.Duration("cooldown", d.IPAM.Cooldown.Duration, "how long a released address rests before reuse")
	f.Bool("allow-imds", d.AllowIMDS, "let containers reach the Instance Metadata Service (169.254.169.254)")
	f.String("log-format", d.LogFormat, "json or text")
	f.String("log-level", d.LogLevel, "debug, info, warn or error")
	return cmd
}

// applyFlags copies the flags a person set over the file's values.
func applyFlags(cmd *cobra.Command, cfg *agent.Config) error {
	f := cmd.Flags()
	str := map[string]*string{"nic": &cfg.NIC, "bpf-root": &cfg.BPFRoot, "state-dir": &cfg.StateDir,
		"metrics-addr": &cfg.MetricsAddr, "log-format": &cfg.LogFormat, "log-level": &cfg.LogLevel}
	for name, dst := range str {
		if f.Changed(name) {
			*dst, _ = f.GetString(name)
		}
	}
	if f.Changed("socket") {
		cfg.Socket, _ = cmd.Root().PersistentFlags().GetString("socket")
	}
	if f.Changed("attach-mode") {
		m, _ := f.GetString("attach-mode")
		cfg.AttachMode = loader.Mode(m)
	}
	if f.Changed("vnet-cidrs") {
		cfg.VNetCIDRs, _ = f.GetStringSlice("vnet-cidrs")
	}
	if f.Changed("static-addresses") {
		cfg.IPAM.Static.Addresses, _ = f.GetStringSlice("static-addresses")
	}
	if f.Changed("allow-imds") {
		cfg.AllowIMDS, _ = f.GetBool("allow-imds")
	}
	if f.Changed("cooldown") {
		cfg.IPAM.Cooldown.Duration, _ = f.GetDuration("cooldown")
	}
	return nil
}

func newLogger(cfg agent.Config) (*slog.Logger, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(cfg.LogLevel)); err != nil {
		return nil, fmt.Errorf("logLevel %q: want debug, info, warn or error", cfg.LogLevel)
	}
	opts := &slog.HandlerOptions{Level: level}
	if cfg.LogFormat == "text" {
		return slog.New(slog.NewTextHandler(os.Stderr, opts)), nil
	}
	return slog.New(slog.NewJSONHandler(os.Stderr, opts)), nil
}

func table(w io.Writer) *tabwriter.Writer { return tabwriter.NewWriter(w, 0, 4, 2, ' ', 0) }

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func short(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}

func pod(o api.Owner) string {
	if o.PodName == "" {
		return "-"
	}
	return o.PodNamespace + "/" + o.PodName
}

var protocols = map[uint8]string{1: "icmp", 6: "tcp", 17: "udp"}

func formatEvent(ev api.DropEvent) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %-18s %s(%d) ", ev.Time.Local().Format("15:04:05.000"), ev.Reason, ev.IfName, ev.IfIndex)
	switch {
	case !ev.Src.IsValid() || (ev.Src.IsUnspecified() && ev.Protocol == 0):
		fmt.Fprintf(&b, "ethertype %#04x src-mac %s", ev.EtherType, ev.SrcMAC)
	default:
		proto := protocols[ev.Protocol]
		if proto == "" {
			proto = fmt.Sprintf("proto-%d", ev.Protocol)
		}
		if ev.SrcPort != 0 || ev.DstPort != 0 {
			fmt.Fprintf(&b, "%s %s:%d -> %s:%d", proto, ev.Src, ev.SrcPort, ev.Dst, ev.DstPort)
		} else {
			fmt.Fprintf(&b, "%s %s -> %s", proto, ev.Src, ev.Dst)
		}
		fmt.Fprintf(&b, " src-mac %s", ev.SrcMAC)
	}
	return b.String()
}

// onClsBPF says how many endpoints attachMode auto has not yet moved to TCX, if any.
func onClsBPF(s api.Status) string {
	if s.EndpointsOnClsBPF == 0 {
		return ""
	}
	return fmt.Sprintf("; %d on cls_bpf until the node is quiet", s.EndpointsOnClsBPF)
}
