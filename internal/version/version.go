// Package version names the build of volumed's binaries: the version set
// at link time (make build: -X …/internal/version.Version=$(git describe)),
// else the module version and VCS revision Go records in the binary.
package version

import (
	"fmt"
	"runtime"
	"runtime/debug"
)

// Version is set at link time by the Makefile; "" means unknown.
var Version string

// String is "<version> (<revision>[, modified]) <go version>", for --version.
func String() string {
	v, rev, modified := Version, "", false
	if info, ok := debug.ReadBuildInfo(); ok {
		if v == "" && info.Main.Version != "" && info.Main.Version != "(devel)" {
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
