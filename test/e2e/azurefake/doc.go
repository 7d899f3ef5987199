// Package azurefake provides a fake Azure Resource Manager (network interfaces only) and a fake
// Instance Metadata Service, so that tests and the demo can run vnetbpf's Azure provider — the
// real armnetwork SDK client, unchanged — on one machine without Azure.
//
// The fakes model what the agent depends on and what can go wrong with it:
//   - ARM (type ARM): NIC GET, list, and PUT as a long-running operation with an
//     Azure-AsyncOperation header, If-Match preconditions, address allocation per subnet (Azure's
//     reserved addresses skipped), validation errors with ARM error bodies, throttling (429 +
//     Retry-After), outages (503), failed and half-applied operations, and a concurrent writer.
//   - IMDS (type IMDS): the network, compute and full instance documents of one VM, the
//     Metadata: true requirement, a propagation delay between an ARM commit and the document
//     showing it, injected 429/500 answers, and a managed-identity token endpoint.
//
// The simulated VNet and the fake IMDS learn about committed IP configurations through
// ARM.OnChange, so one ARM drives routing and every node's metadata from a single state.
//
// Both fakes are plain http.Handlers; serve ARM over TLS (NewTLS) because azcore refuses to send
// a bearer token over plain http.
package azurefake
