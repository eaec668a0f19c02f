//go:build tools

// Package tools pins the OCI registry the local environment's kubelet nodes pull from.
package tools

import _ "github.com/distribution/distribution/v3/cmd/registry"
