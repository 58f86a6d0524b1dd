// The image builder behind images/build.sh: OCI image layouts and oci-archive
// tarballs from static binaries, byte-reproducible, with no daemon and no base image.

module ckpt.local/images/ocibuild

go 1.26.0

require github.com/google/go-containerregistry v0.22.1

require (
	github.com/klauspost/compress v1.19.2 // indirect
	github.com/opencontainers/go-digest v1.0.0 // indirect
	github.com/opencontainers/image-spec v1.1.1 // indirect
	golang.org/x/sync v0.22.0 // indirect
)
