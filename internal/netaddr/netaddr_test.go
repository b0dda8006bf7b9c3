package netaddr_test

import (
	"testing"

	"github.com/volumed/volumed/internal/netaddr"
)

// TestIsLoopback: which --listen and --nbd-listen values bind loopback
// only (no token or TLS required).
func TestIsLoopback(t *testing.T) {
	tests := []struct {
		listen string
		want   bool
	}{
		{"127.0.0.1:8090", true},
		{"127.1.2.3:1", true},
		{"[::1]:10809", true},
		{"localhost:8090", true},
		{"LOCALHOST:1", true},
		{":8090", false},
		{"0.0.0.0:10809", false},
		{"[::]:8090", false},
		{"10.0.0.5:8090", false},
		{"192.0.2.7:10809", false},
		{"example.com:8090", false},
		{"garbage", false},
	}
	for _, tt := range tests {
		if got := netaddr.IsLoopback(tt.listen); got != tt.want {
			t.Errorf("IsLoopback(%q) = %v, want %v", tt.listen, got, tt.want)
		}
	}
}
