// Package version names the build of volumed's binaries: the version set
// at link time (make build: -X …/internal/version.Version=$(git describe)),
// else the module version and VCS revision Go records in the binary.
package version

import (
	"fmt"
	"regexp"
	"runtime"
	"runtime/debug"
	"strings"
)

// Version is set at link time by the Makefile; "" means unknown.
var Version string

// semverRE matches a semantic version (semver.org), as NATS micro
// requires of a service's version.
var semverRE = regexp.MustCompile(`^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)` +
	`(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?` +
	`(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$`)

// Semver is the version as a semantic version, for the NATS micro
// service: Version (a leading "v" dropped) when it is one, else
// "0.0.0-devel", with the VCS revision as build metadata when known.
func Semver() string {
	if v := strings.TrimPrefix(Version, "v"); semverRE.MatchString(v) {
		return v
	}
	_, rev, _ := build()
	if len(rev) > 12 {
		rev = rev[:12]
	}
	if rev != "" {
		return "0.0.0-devel+" + rev
	}
	return "0.0.0-devel"
}

// build reads the module version, VCS revision and modified flag Go
// recorded in the binary.
func build() (v, rev string, modified bool) {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return "", "", false
	}
	if info.Main.Version != "" && info.Main.Version != "(devel)" {
		v = info.Main.Version
	}
	for _, s := range info.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			modified = s.Value == "true"
		}
	}
	return v, rev, modified
}

// String is "<version> (<revision>[, modified]) <go version>", for --version.
func String() string {
	v := Version
	mod, rev, modified := build()
	if v == "" {
		v = mod
	}
	if v == "" {
		v = "devel"
	}
	if len(rev) > 12 {
		rev = rev[:12]
	}
	switch {
	case rev != "" && modified:
		v += " (" + rev + ", modified)"
	case rev != "":
		v += " (" + rev + ")"
	}
	return fmt.Sprintf("%s %s", v, runtime.Version())
}
