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
