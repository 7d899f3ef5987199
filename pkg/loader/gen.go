package loader

// The generated datapath_bpfel.{go,o} are committed so that `go build` needs no clang;
// `make generate` reruns this with Debian 12's clang-19 and `make verify-generated` checks
// that the committed files match a fresh build byte for byte.
//go:generate go tool bpf2go -cc clang-19 -strip llvm-strip-19 -tags linux -target bpfel -type endpoint_key -type endpoint -type vnet_key -type vnet_cidr -type vnet_cidr_flags -type node_config -type node_config_flags -type stat_reason -type stat -type endpoint_stat -type drop_event Datapath ../../bpf/datapath.c -- -I../../bpf/include -I/usr/include/x86_64-linux-gnu -Wall -Werror
