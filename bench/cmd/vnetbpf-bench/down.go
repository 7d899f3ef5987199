package main

import (
	"fmt"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/vnetbpf/vnetbpf/bench/resources"
)

func downCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "down",
		Short: "Remove what a killed run left behind: its processes, namespaces and pins",
		RunE: func(*cobra.Command, []string) error {
			reg, err := resources.Load(filepath.Join(stateDir, "resources.json"))
			if err != nil {
				return err
			}
			n := len(reg.Netns) + len(reg.PIDs) + len(reg.BPFRoots) + len(reg.Dirs)
			if err := reg.Teardown(); err != nil {
				return err
			}
			fmt.Printf("removed %d leftovers of an earlier run\n", n)
			return nil
		},
	}
}
