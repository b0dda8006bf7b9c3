package version

import (
	"runtime"
	"strings"
	"testing"
)

func TestString(t *testing.T) {
	tests := []struct{ set, prefix string }{
		{"", ""}, // whatever the build info says, never empty
		{"v1.2.3", "v1.2.3"},
	}
	for _, tc := range tests {
		Version = tc.set
		got := String()
		if !strings.HasSuffix(got, " "+runtime.Version()) || !strings.HasPrefix(got, tc.prefix) || strings.HasPrefix(got, " ") {
			t.Errorf("Version=%q: String() = %q", tc.set, got)
		}
	}
	Version = ""
}

// TestSemver: the micro service's version is always a semantic version.
func TestSemver(t *testing.T) {
	for _, tc := range []struct{ set, want string }{
		{"v1.2.3", "1.2.3"},
		{"1.4.0-rc.1+build.7", "1.4.0-rc.1+build.7"},
		{"eb11269-dirty", ""}, // git describe without a tag: not one
		{"", ""},
	} {
		Version = tc.set
		got := Semver()
		if !semverRE.MatchString(got) || (tc.want != "" && got != tc.want) || (tc.want == "" && !strings.HasPrefix(got, "0.0.0-devel")) {
			t.Errorf("Version=%q: Semver() = %q, want %q", tc.set, got, tc.want)
		}
	}
	Version = ""
}
