// Package ociimage writes container images as OCI image-layout tar archives, the format
// `ctr images import` reads, so that tests can give containerd an image without a registry.
//
// It writes the JSON documents of the OCI image spec by hand: an image of one uncompressed
// layer needs only four small structs, not the image-spec module.
package ociimage

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path"
	"strings"
	"time"
)

// Media types and annotations of the OCI image spec and containerd.
const (
	MediaTypeIndex    = "application/vnd.oci.image.index.v1+json"
	MediaTypeManifest = "application/vnd.oci.image.manifest.v1+json"
	MediaTypeConfig   = "application/vnd.oci.image.config.v1+json"
	MediaTypeLayer    = "application/vnd.oci.image.layer.v1.tar"
	// AnnotationRefName is the OCI annotation for a manifest's tag in index.json.
	AnnotationRefName = "org.opencontainers.image.ref.name"
	// AnnotationImageName is containerd's annotation for the full reference an import
	// stores the image under. Without it `ctr images import` names the image after
	// AnnotationRefName alone, a tag without a repository.
	AnnotationImageName = "io.containerd.image.name"
)

// File is one regular file of the image's single layer.
type File struct {
	Path string // absolute path in the container, e.g. /pause
	Mode int64  // permission bits, e.g. 0o755
	Data []byte
}

// Image is a one-layer image for one platform.
type Image struct {
	Name         string   // full reference, e.g. localhost/vnetbpf/pause:3.10
	OS           string   // e.g. linux
	Architecture string   // GOARCH spelling, e.g. amd64
	Entrypoint   []string // e.g. ["/pause"]
	User         string   // e.g. 65535:65535; empty is root
	Files        []File
}

// Descriptor is an OCI content descriptor.
type Descriptor struct {
	MediaType   string            `json:"mediaType"`
	Digest      string            `json:"digest"`
	Size        int64             `json:"size"`
	Platform    *Platform         `json:"platform,omitempty"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

// Platform names the OS and CPU architecture an image runs on.
type Platform struct {
	Architecture string `json:"architecture"`
	OS           string `json:"os"`
}

// Index is index.json, the entry point of an image layout.
type Index struct {
	SchemaVersion int          `json:"schemaVersion"`
	MediaType     string       `json:"mediaType"`
	Manifests     []Descriptor `json:"manifests"`
}

// Manifest is an image manifest: one config and the layers.
type Manifest struct {
	SchemaVersion int          `json:"schemaVersion"`
	MediaType     string       `json:"mediaType"`
	Config        Descriptor   `json:"config"`
	Layers        []Descriptor `json:"layers"`
}

// Config is the image configuration, with only the fields this package sets.
type Config struct {
	Created      string          `json:"created"`
	Architecture string          `json:"architecture"`
	OS           string          `json:"os"`
	Config       ExecutionConfig `json:"config"`
	RootFS       RootFS          `json:"rootfs"`
}

// ExecutionConfig is what a runtime starts the container with.
type ExecutionConfig struct {
	User       string   `json:"User,omitempty"`
	Entrypoint []string `json:"Entrypoint"`
}

// RootFS lists the uncompressed layers' digests.
type RootFS struct {
	Type    string   `json:"type"`
	DiffIDs []string `json:"diff_ids"`
}

// created is fixed so that the same files always make the same digests.
var created = time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)

// Write writes img to w as an OCI image-layout tar: oci-layout, index.json and
// blobs/sha256/ holding the layer, the config and the manifest.
func Write(w io.Writer, img Image) error {
	if err := img.validate(); err != nil {
		return err
	}
	layer, err := img.layer()
	if err != nil {
		return err
	}
	layerDesc := describe(MediaTypeLayer, layer)
	config, err := json.Marshal(Config{
		Created:      created.Format(time.RFC3339),
		Architecture: img.Architecture,
		OS:           img.OS,
		Config:       ExecutionConfig{User: img.User, Entrypoint: img.Entrypoint},
		// The layer is not compressed, so its digest is also its diff ID.
		RootFS: RootFS{Type: "layers", DiffIDs: []string{layerDesc.Digest}},
	})
	if err != nil {
		return err
	}
	configDesc := describe(MediaTypeConfig, config)
	manifest, err := json.Marshal(Manifest{SchemaVersion: 2, MediaType: MediaTypeManifest, Config: configDesc, Layers: []Descriptor{layerDesc}})
	if err != nil {
		return err
	}
	manifestDesc := describe(MediaTypeManifest, manifest)
	manifestDesc.Platform = &Platform{Architecture: img.Architecture, OS: img.OS}
	manifestDesc.Annotations = map[string]string{AnnotationImageName: img.Name, AnnotationRefName: tag(img.Name)}
	index, err := json.Marshal(Index{SchemaVersion: 2, MediaType: MediaTypeIndex, Manifests: []Descriptor{manifestDesc}})
	if err != nil {
		return err
	}

	tw := tar.NewWriter(w)
	entries := []struct {
		name string
		data []byte
	}{
		{"oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)},
		{blobPath(layerDesc), layer},
		{blobPath(configDesc), config},
		{blobPath(manifestDesc), manifest},
		{"index.json", index},
	}
	for _, dir := range []string{"blobs/", "blobs/sha256/"} {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: dir, Mode: 0o755, ModTime: created}); err != nil {
			return err
		}
	}
	for _, e := range entries {
		if err := writeFile(tw, e.name, 0o644, e.data); err != nil {
			return err
		}
	}
	return tw.Close()
}

func (img Image) validate() error {
	if img.OS == "" || img.Architecture == "" {
		return errors.New("image needs an OS and an architecture")
	}
	if len(img.Entrypoint) == 0 {
		return errors.New("image needs an entrypoint")
	}
	// A reference without a repository is what must not be imported: containerd would keep
	// a bare tag, which the CRI plugin cannot resolve.
	if !strings.Contains(img.Name, "/") || tag(img.Name) == "" {
		return fmt.Errorf("image name %q is not a full reference such as localhost/name:tag", img.Name)
	}
	for _, f := range img.Files {
		if !path.IsAbs(f.Path) {
			return fmt.Errorf("file path %q is not absolute", f.Path)
		}
	}
	return nil
}

// layer is the uncompressed tar of img's files, with the directories leading to them.
func (img Image) layer() ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	dirs := make(map[string]bool)
	for _, f := range img.Files {
		rel := strings.TrimPrefix(path.Clean(f.Path), "/")
		for d := path.Dir(rel); d != "."; d = path.Dir(d) {
			if dirs[d] {
				continue
			}
			dirs[d] = true
			if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: 0o755, ModTime: created}); err != nil {
				return nil, err
			}
		}
		if err := writeFile(tw, rel, f.Mode, f.Data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func writeFile(tw *tar.Writer, name string, mode int64, data []byte) error {
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Size: int64(len(data)), ModTime: created}); err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	if _, err := tw.Write(data); err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	return nil
}

func describe(mediaType string, data []byte) Descriptor {
	sum := sha256.Sum256(data)
	return Descriptor{MediaType: mediaType, Digest: "sha256:" + hex.EncodeToString(sum[:]), Size: int64(len(data))}
}

func blobPath(d Descriptor) string {
	return "blobs/" + strings.Replace(d.Digest, ":", "/", 1)
}

// tag is the part of a reference after the last colon that follows the last slash.
func tag(ref string) string {
	slash := strings.LastIndex(ref, "/")
	if i := strings.LastIndex(ref, ":"); i > slash {
		return ref[i+1:]
	}
	return ""
}
