// Command ocibuild turns one static binary into an OCI image, written both as an
// OCI image layout directory and as an oci-archive tarball (that directory as a
// tar), with no base image and no daemon.
//
//	ocibuild -binary target/x86_64-unknown-linux-musl/release/ckpt-convert \
//	  -path /ckpt-convert -ref ghcr.io/ckpt-dev/ckpt-convert:0.1.0 \
//	  -label org.opencontainers.image.revision=$(git rev-parse HEAD) \
//	  -epoch "$SOURCE_DATE_EPOCH" -layout out/ckpt-convert -archive out/ckpt-convert.tar
//
// The same inputs give byte-identical outputs: every timestamp is -epoch, tar
// entries are sorted and carry uid/gid 0, fixed modes and no user or group
// names, no host path reaches the image, and JSON is written by encoding/json
// (sorted map keys). The manifest digest is printed on stdout.
package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

type multi []string

func (m *multi) String() string     { return strings.Join(*m, ",") }
func (m *multi) Set(v string) error { *m = append(*m, v); return nil }

type options struct {
	binary     string
	path       string
	ref        string
	user       string
	epoch      int64
	layoutDir  string
	archive    string
	labels     multi
	env        multi
	expose     multi
	entrypoint multi
	arch       string
}

func main() {
	var o options
	flag.StringVar(&o.binary, "binary", "", "the static binary to put into the image (required)")
	flag.StringVar(&o.path, "path", "", "its absolute path in the image, e.g. /ckpt-convert (required)")
	flag.StringVar(&o.ref, "ref", "", "the image reference recorded in the layout, e.g. ghcr.io/ckpt-dev/ckpt-convert:0.1.0 (required)")
	flag.StringVar(&o.user, "user", "65532:65532", "the image's user:group (numeric, so runAsNonRoot can check it)")
	flag.Int64Var(&o.epoch, "epoch", -1, "every timestamp, in seconds since 1970 (SOURCE_DATE_EPOCH; required)")
	flag.StringVar(&o.layoutDir, "layout", "", "write the OCI image layout into this directory (replaced)")
	flag.StringVar(&o.archive, "archive", "", "write the oci-archive tarball to this file (replaced)")
	flag.StringVar(&o.arch, "arch", "amd64", "the image's architecture (GOARCH spelling)")
	flag.Var(&o.labels, "label", "a label KEY=VALUE (repeatable)")
	flag.Var(&o.env, "env", "an environment variable KEY=VALUE of the image's config (repeatable)")
	flag.Var(&o.expose, "expose", "an exposed port, e.g. 8080/tcp (repeatable)")
	flag.Var(&o.entrypoint, "arg", "an argument appended to the entrypoint after -path (repeatable)")
	flag.Parse()
	digest, err := run(o)
	if err != nil {
		fmt.Fprintln(os.Stderr, "ocibuild:", err)
		os.Exit(1)
	}
	fmt.Println(digest)
}

func run(o options) (string, error) {
	switch {
	case o.binary == "" || o.path == "" || o.ref == "":
		return "", errors.New("-binary, -path and -ref are required")
	case !path.IsAbs(o.path) || path.Clean(o.path) != o.path || o.path == "/":
		return "", fmt.Errorf("-path %q: expected a clean absolute file path", o.path)
	case o.epoch < 0:
		return "", errors.New("-epoch is required (e.g. SOURCE_DATE_EPOCH=$(git log -1 --format=%ct))")
	case o.layoutDir == "" && o.archive == "":
		return "", errors.New("nothing to write: give -layout, -archive or both")
	}
	created := time.Unix(o.epoch, 0).UTC()
	name, tag, ok := splitRef(o.ref)
	if !ok {
		return "", fmt.Errorf("-ref %q: expected NAME:TAG", o.ref)
	}

	bin, err := os.ReadFile(o.binary)
	if err != nil {
		return "", err
	}
	layerTar, err := singleFileTar(strings.TrimPrefix(o.path, "/"), bin, created)
	if err != nil {
		return "", err
	}
	layer, err := tarball.LayerFromOpener(
		func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(layerTar)), nil },
		tarball.WithMediaType(types.OCILayer),
		tarball.WithCompressionLevel(gzip.BestCompression),
	)
	if err != nil {
		return "", err
	}

	labels := map[string]string{}
	for _, kv := range o.labels {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return "", fmt.Errorf("-label %q: expected KEY=VALUE", kv)
		}
		labels[k] = v
	}
	for _, kv := range o.env {
		if k, _, ok := strings.Cut(kv, "="); !ok || k == "" {
			return "", fmt.Errorf("-env %q: expected KEY=VALUE", kv)
		}
	}
	var exposed map[string]struct{}
	if len(o.expose) > 0 {
		exposed = map[string]struct{}{}
		for _, p := range o.expose {
			exposed[p] = struct{}{}
		}
	}
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	img, err = mutate.ConfigFile(img, &v1.ConfigFile{
		Architecture: o.arch,
		OS:           "linux",
		Created:      v1.Time{Time: created},
		Config: v1.Config{
			User:         o.user,
			Entrypoint:   append([]string{o.path}, o.entrypoint...),
			Labels:       labels,
			Env:          o.env,
			ExposedPorts: exposed,
			WorkingDir:   "/",
		},
		RootFS: v1.RootFS{Type: "layers"},
	})
	if err != nil {
		return "", err
	}
	img, err = mutate.Append(img, mutate.Addendum{
		Layer:     layer,
		MediaType: types.OCILayer,
		History: v1.History{
			Created:   v1.Time{Time: created},
			CreatedBy: "ocibuild: " + o.path,
			Comment:   "a static binary; no base image",
		},
	})
	if err != nil {
		return "", err
	}
	digest, err := img.Digest()
	if err != nil {
		return "", err
	}

	// Written to a fresh temp directory first: layout.Write appends to an
	// existing index, and a half-written output must never look complete.
	tmp, err := os.MkdirTemp(filepath.Dir(firstNonEmpty(o.layoutDir, o.archive)), ".ocibuild-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tmp)
	lp, err := layout.Write(tmp, empty.Index)
	if err != nil {
		return "", err
	}
	// The index entry is written by hand: ggcr's AppendImage would also set
	// artifactType, which OCI reserves for artifacts, not images.
	if err := lp.WriteImage(img); err != nil {
		return "", err
	}
	size, err := img.Size()
	if err != nil {
		return "", err
	}
	mediaType, err := img.MediaType()
	if err != nil {
		return "", err
	}
	// io.containerd.image.name names the image for `ctr images import`, kind and
	// Docker; org.opencontainers.image.ref.name is the tag, as skopeo writes it.
	if err := lp.AppendDescriptor(v1.Descriptor{
		MediaType: mediaType,
		Size:      size,
		Digest:    digest,
		Annotations: map[string]string{
			"io.containerd.image.name":          name + ":" + tag,
			"org.opencontainers.image.ref.name": tag,
		},
		Platform: &v1.Platform{OS: "linux", Architecture: o.arch},
	}); err != nil {
		return "", err
	}
	if o.archive != "" {
		data, err := tarDir(tmp, created)
		if err != nil {
			return "", err
		}
		if err := replaceFile(o.archive, data); err != nil {
			return "", err
		}
	}
	if o.layoutDir != "" {
		if err := normalizeTree(tmp, created); err != nil {
			return "", err
		}
		if err := os.RemoveAll(o.layoutDir); err != nil {
			return "", err
		}
		if err := os.Rename(tmp, o.layoutDir); err != nil {
			return "", err
		}
	}
	return digest.String(), nil
}

func firstNonEmpty(s ...string) string {
	for _, v := range s {
		if v != "" {
			return v
		}
	}
	return ""
}

// splitRef splits NAME:TAG at the last colon after the last slash, so that a
// registry port (localhost:5000/x:1) stays in the name.
func splitRef(ref string) (name, tag string, ok bool) {
	i := strings.LastIndex(ref, ":")
	if i <= 0 || i < strings.LastIndex(ref, "/") || i == len(ref)-1 {
		return "", "", false
	}
	return ref[:i], ref[i+1:], true
}

// header gives every entry the same owner, no names and the fixed time.
func header(name string, typ byte, mode int64, size int64, t time.Time) *tar.Header {
	return &tar.Header{
		Typeflag: typ,
		Name:     name,
		Mode:     mode,
		Size:     size,
		ModTime:  t,
		Format:   tar.FormatPAX,
	}
}

// singleFileTar is the image's one layer: the binary, owned by root and not
// writable by anyone, so the image's user can run it but never change it.
func singleFileTar(name string, data []byte, t time.Time) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	// Parent directories first, as a runtime unpacks them.
	dirs := strings.Split(name, "/")
	for i := 1; i < len(dirs); i++ {
		if err := tw.WriteHeader(header(strings.Join(dirs[:i], "/")+"/", tar.TypeDir, 0o755, 0, t)); err != nil {
			return nil, err
		}
	}
	if err := tw.WriteHeader(header(name, tar.TypeReg, 0o555, int64(len(data)), t)); err != nil {
		return nil, err
	}
	if _, err := tw.Write(data); err != nil {
		return nil, err
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// tarDir archives the layout directory as skopeo's oci-archive transport
// expects it (paths relative to the layout root), in sorted order.
func tarDir(root string, t time.Time) ([]byte, error) {
	var paths []string
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p != root {
			paths = append(paths, p)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	sort.Strings(paths)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, p := range paths {
		rel, err := filepath.Rel(root, p)
		if err != nil {
			return nil, err
		}
		rel = filepath.ToSlash(rel)
		info, err := os.Lstat(p)
		if err != nil {
			return nil, err
		}
		switch {
		case info.IsDir():
			if err := tw.WriteHeader(header(rel+"/", tar.TypeDir, 0o755, 0, t)); err != nil {
				return nil, err
			}
		case info.Mode().IsRegular():
			data, err := os.ReadFile(p)
			if err != nil {
				return nil, err
			}
			if err := tw.WriteHeader(header(rel, tar.TypeReg, 0o644, int64(len(data)), t)); err != nil {
				return nil, err
			}
			if _, err := tw.Write(data); err != nil {
				return nil, err
			}
		default:
			return nil, fmt.Errorf("%s: unexpected file type %v in the layout", p, info.Mode().Type())
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// normalizeTree gives the layout directory the same modes and times as the
// archive, so that copying it (or tarring it with --sort) is reproducible too.
func normalizeTree(root string, t time.Time) error {
	return filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		mode := fs.FileMode(0o644)
		if d.IsDir() {
			mode = 0o755
		}
		if err := os.Chmod(p, mode); err != nil {
			return err
		}
		return os.Chtimes(p, t, t)
	})
}

func replaceFile(dst string, data []byte) error {
	tmp := dst + ".tmp"
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, dst)
}
