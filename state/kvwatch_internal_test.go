package state

import (
	"testing"

	"github.com/nats-io/nats.go/jetstream"
)

// TestHoldsCurrent: the first read prefers its own server only when that
// server leads the stream or holds a current replica that is not behind.
func TestHoldsCurrent(t *testing.T) {
	cluster := func(replicas ...*jetstream.PeerInfo) *jetstream.ClusterInfo {
		return &jetstream.ClusterInfo{Leader: "s1", Replicas: replicas}
	}
	for _, tc := range []struct {
		name    string
		c       *jetstream.ClusterInfo
		server  string
		current bool
	}{
		{"single server", nil, "s1", false},
		{"no server name", cluster(), "", false},
		{"leader", cluster(&jetstream.PeerInfo{Name: "s2"}), "s1", true},
		{"current replica", cluster(&jetstream.PeerInfo{Name: "s2", Current: true}), "s2", true},
		{"replica behind", cluster(&jetstream.PeerInfo{Name: "s2", Current: true, Lag: 3}), "s2", false},
		{"replica not current", cluster(&jetstream.PeerInfo{Name: "s2"}), "s2", false},
		{"replica offline", cluster(&jetstream.PeerInfo{Name: "s2", Current: true, Offline: true}), "s2", false},
		{"no replica here", cluster(&jetstream.PeerInfo{Name: "s2", Current: true}), "s3", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := holdsCurrent(tc.c, tc.server); got != tc.current {
				t.Fatalf("holdsCurrent = %v, want %v", got, tc.current)
			}
		})
	}
}
