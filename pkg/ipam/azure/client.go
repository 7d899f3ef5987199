package azure

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/arm"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/cloud"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/azidentity"
	"github.com/Azure/azure-sdk-for-go/sdk/resourcemanager/network/armnetwork/v7"
)

// DefaultARMEndpoint is Azure Resource Manager in the public cloud.
const DefaultARMEndpoint = "https://management.azure.com"

// Credential kinds for Config.Credential.
const (
	CredentialManagedIdentity = "managedIdentity"
	CredentialDefault         = "default"
	CredentialTokenFile       = "tokenFile"
)

// newCredential builds the credential the ARM client signs requests with.
func newCredential(cfg Config) (azcore.TokenCredential, error) {
	switch cfg.Credential {
	case "", CredentialManagedIdentity:
		opts := &azidentity.ManagedIdentityCredentialOptions{}
		if cfg.ClientID != "" {
			opts.ID = azidentity.ClientID(cfg.ClientID)
		}
		return azidentity.NewManagedIdentityCredential(opts)
	case CredentialDefault:
		return azidentity.NewDefaultAzureCredential(nil)
	case CredentialTokenFile:
		if cfg.TokenFile == "" {
			return nil, fmt.Errorf("ipam.azure.credential tokenFile needs ipam.azure.tokenFile")
		}
		return tokenFile(cfg.TokenFile), nil
	}
	return nil, fmt.Errorf("ipam.azure.credential %q: want managedIdentity, default or tokenFile", cfg.Credential)
}

// tokenFile is a bearer token read from a file at every request, so a token rotated on disk
// (workload identity's projected token, a test's) is picked up without a restart.
type tokenFile string

func (f tokenFile) GetToken(context.Context, policy.TokenRequestOptions) (azcore.AccessToken, error) {
	b, err := os.ReadFile(string(f))
	if err != nil {
		return azcore.AccessToken{}, fmt.Errorf("read token file: %w", err)
	}
	tok := strings.TrimSpace(string(b))
	if tok == "" {
		return azcore.AccessToken{}, fmt.Errorf("token file %s is empty", string(f))
	}
	// Valid briefly, so that azcore asks again soon and sees a rotated file.
	return azcore.AccessToken{Token: tok, ExpiresOn: time.Now().Add(5 * time.Minute)}, nil
}

// newInterfacesClient builds the armnetwork client for the configured endpoint, trusting
// caFile in addition to the system's roots when set.
func newInterfacesClient(cfg Config, cred azcore.TokenCredential, transport policy.Transporter) (*armnetwork.InterfacesClient, error) {
	endpoint := cfg.ARMEndpoint
	if endpoint == "" {
		endpoint = DefaultARMEndpoint
	}
	opts := &arm.ClientOptions{ClientOptions: policy.ClientOptions{
		Cloud: cloud.Configuration{
			ActiveDirectoryAuthorityHost: cloud.AzurePublic.ActiveDirectoryAuthorityHost,
			Services: map[cloud.ServiceName]cloud.ServiceConfiguration{
				cloud.ResourceManager: {Endpoint: endpoint, Audience: DefaultARMEndpoint},
			},
		},
		// A few quick retries for a blip; the provider's own loop backs off beyond that, and an
		// ADD waiting for growth hears about an outage within seconds.
		Retry:     policy.RetryOptions{MaxRetries: 3, RetryDelay: 500 * time.Millisecond, MaxRetryDelay: 30 * time.Second},
		Transport: transport,
	}}
	if transport == nil && cfg.CAFile != "" {
		pem, err := os.ReadFile(cfg.CAFile)
		if err != nil {
			return nil, fmt.Errorf("ipam.azure.caFile: %w", err)
		}
		roots, err := x509.SystemCertPool()
		if err != nil {
			roots = x509.NewCertPool()
		}
		if !roots.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("ipam.azure.caFile %s holds no PEM certificate", cfg.CAFile)
		}
		opts.Transport = &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}}}
	}
	return armnetwork.NewInterfacesClient(cfg.SubscriptionID, cred, opts)
}
