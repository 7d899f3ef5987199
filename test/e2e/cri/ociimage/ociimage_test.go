package ociimage

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"strings"
	"testing"
)

// readTar maps each regular file of a tar archive to its contents.
func readTar(t *testing.T, b []byte) map[string][]byte {
	t.Helper()
	files := make(map[string][]byte)
	tr := tar.NewReader(bytes.NewReader(b))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return files
		}
		if err != nil {
			t.Fatalf("read tar: %v", err)
		}
		if h.Typeflag != tar.TypeReg {
			continue
		}
		data, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		files[h.Name] = data
	}
}

// blob returns the blob d points to after checking that its size and digest match.
func blob(t *testing.T, files map[string][]byte, d Descriptor) []byte {
	t.Helper()
	data, ok := files["blobs/"+strings.Replace(d.Digest, ":", "/", 1)]
	if !ok {
		t.Fatalf("blob %s is not in the layout", d.Digest)
	}
	sum := sha256.Sum256(data)
	if got := "sha256:" + hex.EncodeToString(sum[:]); got != d.Digest || int64(len(data)) != d.Size {
		t.Fatalf("blob %s: content has digest %s and size %d, descriptor says %d", d.Digest, got, len(data), d.Size)
	}
	return data
}

// TestWrite follows the layout from index.json to the layer and checks every link.
func TestWrite(t *testing.T) {
	img := Image{Name: "localhost/vnetbpf/pause:3.10", OS: "linux", Architecture: "amd64",
		Entrypoint: []string{"/pause"}, User: "65535:65535",
		Files: []File{{Path: "/pause", Mode: 0o755, Data: []byte("binary")}, {Path: "/etc/x/y", Mode: 0o644, Data: []byte("y")}}}
	var buf bytes.Buffer
	if err := Write(&buf, img); err != nil {
		t.Fatal(err)
	}
	files := readTar(t, buf.Bytes())
	if string(files["oci-layout"]) != `{"imageLayoutVersion":"1.0.0"}` {
		t.Errorf("oci-layout is %q", files["oci-layout"])
	}
	var idx Index
	if err := json.Unmarshal(files["index.json"], &idx); err != nil {
		t.Fatalf("index.json: %v", err)
	}
	if len(idx.Manifests) != 1 {
		t.Fatalf("index has %d manifests, want 1", len(idx.Manifests))
	}
	md := idx.Manifests[0]
	if md.Annotations[AnnotationImageName] != img.Name || md.Annotations[AnnotationRefName] != "3.10" {
		t.Errorf("manifest annotations %v: want the full name under %s and the tag under %s", md.Annotations, AnnotationImageName, AnnotationRefName)
	}
	if md.Platform == nil || md.Platform.OS != "linux" || md.Platform.Architecture != "amd64" {
		t.Errorf("manifest platform %+v, want linux/amd64", md.Platform)
	}
	var m Manifest
	if err := json.Unmarshal(blob(t, files, md), &m); err != nil {
		t.Fatal(err)
	}
	var cfg Config
	if err := json.Unmarshal(blob(t, files, m.Config), &cfg); err != nil {
		t.Fatal(err)
	}
	if len(m.Layers) != 1 || len(cfg.RootFS.DiffIDs) != 1 || cfg.RootFS.DiffIDs[0] != m.Layers[0].Digest {
		t.Fatalf("layers %+v and diff IDs %v: want one uncompressed layer whose digest is its diff ID", m.Layers, cfg.RootFS.DiffIDs)
	}
	if strings.Join(cfg.Config.Entrypoint, " ") != "/pause" || cfg.Config.User != "65535:65535" {
		t.Errorf("config %+v: want entrypoint /pause and user 65535:65535", cfg.Config)
	}
	layer := readTar(t, blob(t, files, m.Layers[0]))
	if string(layer["pause"]) != "binary" || string(layer["etc/x/y"]) != "y" {
		t.Errorf("layer files %v: want pause and etc/x/y with their contents", keys(layer))
	}

	var again bytes.Buffer
	if err := Write(&again, img); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf.Bytes(), again.Bytes()) {
		t.Error("writing the same image twice gave different archives")
	}
}

// TestWriteRejectsBareTag: a name without a repository would be imported as a bare tag.
func TestWriteRejectsBareTag(t *testing.T) {
	for _, name := range []string{"3.10", "pause:3.10", "localhost/pause"} {
		err := Write(io.Discard, Image{Name: name, OS: "linux", Architecture: "amd64", Entrypoint: []string{"/pause"}})
		if err == nil {
			t.Errorf("image name %q accepted", name)
		}
	}
}

func keys(m map[string][]byte) []string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	return ks
}
