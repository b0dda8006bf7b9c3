package redisstore_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/internal/upgrade"
	"github.com/volumed/volumed/state"
	"github.com/volumed/volumed/stores/redisstore"
)

var quietLog = slog.New(slog.NewTextHandler(io.Discard, nil))

// TestRedisUpgradeFromFirstLayout: the records of the first releases
// (JSON strings under "volumed:") are copied into the current layout at
// start, indexes and counts included; a second run (a crash before the
// format was recorded) copies nothing twice; a newer format is refused.
func TestRedisUpgradeFromFirstLayout(t *testing.T) {
	srv := testenv.StartRedis(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	raw := redis.NewClient(&redis.Options{Addr: srv.Addr})
	defer raw.Close()
	vm := "vm-1"
	legacy := map[string]string{
		"volumed:op:op-1":                   `{"id":"op-1","type":"create","status":"completed","volume_id":"vol-1","created_at":"2026-11-25T20:00:00Z","completed_at":"2026-11-25T20:00:01Z"}`,
		"volumed:op:op-2":                   `{"id":"op-2","type":"attach","status":"pending","volume_id":"vol-1","vm_id":"vm-1","created_at":"2026-11-25T20:01:00Z"}`,
		"volumed:mapping:vol-1":             `{"volume_id":"vol-1","vm_id":"vm-1","device_path":"/dev/vdb","status":"attached"}`,
		"volumed:mapping:dev:vm-1:/dev/vdb": "vol-1",
		"volumed:export:vol-1":              `{"volume_id":"vol-1","name":"vol-1","vm_id":"vm-1","device_path":"/dev/vdb"}`,
	}
	for k, v := range legacy {
		if err := raw.Set(ctx, k, v, 0).Err(); err != nil {
			t.Fatal(err)
		}
	}
	if err := raw.ZAdd(ctx, "volumed:ops:all", redis.Z{Member: "op-1"}, redis.Z{Member: "op-2"}).Err(); err != nil {
		t.Fatal(err)
	}
	s, err := redisstore.New(ctx, redisstore.Config{URL: srv.URL(), Logger: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close(ctx)
	check := func(round int) map[string]uint64 {
		t.Helper()
		if err := state.Upgrade(ctx, s, quietLog); err != nil {
			t.Fatalf("round %d: upgrade: %v", round, err)
		}
		revs := map[string]uint64{}
		for _, id := range []string{"op-1", "op-2"} {
			op, err := s.GetOperation(ctx, id)
			if err != nil {
				t.Fatalf("round %d: operation %s: %v", round, id, err)
			}
			revs[id] = op.Revision
		}
		pending, _, err := s.ListOperations(ctx, state.Filter{Status: commands.StatusPending})
		if err != nil || len(pending) != 1 || pending[0].ID != "op-2" || pending[0].VM() != vm {
			t.Fatalf("round %d: pending operations %v (%v), want op-2 on %s", round, pending, err, vm)
		}
		st, err := s.Stats(ctx)
		if err != nil || st.Total != 2 || st.Terminal != 1 {
			t.Fatalf("round %d: stats %+v (%v), want 2 operations, 1 terminal", round, st, err)
		}
		m, err := s.GetMappingByDevice(ctx, vm, "/dev/vdb")
		if err != nil || m.VolumeID != "vol-1" {
			t.Fatalf("round %d: mapping by device: %v %v", round, m, err)
		}
		revs["map"] = m.Revision
		e, err := s.GetExport(ctx, "vol-1")
		if err != nil || e.DevicePath != "/dev/vdb" {
			t.Fatalf("round %d: export: %v %v", round, e, err)
		}
		revs["export"] = e.Revision
		return revs
	}
	first := check(1)
	if err := raw.Del(ctx, redisstore.DefaultPrefix+"format").Err(); err != nil {
		t.Fatal(err)
	}
	if second := check(2); !equalRevs(first, second) {
		t.Fatalf("a second run rewrote records: revisions %v then %v", first, second)
	}
	if err := raw.Set(ctx, redisstore.DefaultPrefix+"format", "7", 0).Err(); err != nil {
		t.Fatal(err)
	}
	if err := state.Upgrade(ctx, s, quietLog); !errors.Is(err, upgrade.ErrRefused) {
		t.Fatalf("upgrade of format 7: %v, want ErrRefused", err)
	}
}

// TestRedisClusterUpgradeFromFirstLayout: on a Redis Cluster the first
// layout's keys are spread over the masters, which are scanned at once;
// every record is copied (run with -race: the copy's counters are shared
// by the masters' scans).
func TestRedisClusterUpgradeFromFirstLayout(t *testing.T) {
	nodes := startCluster(t, 3)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	addrs := make([]string, len(nodes))
	for i, n := range nodes {
		addrs[i] = n.Addr
	}
	raw := redis.NewClusterClient(&redis.ClusterOptions{Addrs: addrs})
	defer raw.Close()
	const n = 30
	for i := range n {
		op := fmt.Sprintf(`{"id":"op-%d","type":"create","status":"completed","volume_id":"vol-%d","created_at":"2026-11-25T20:00:00Z","completed_at":"2026-11-25T20:00:01Z"}`, i, i)
		if err := raw.Set(ctx, fmt.Sprintf("volumed:op:op-%d", i), op, 0).Err(); err != nil {
			t.Fatal(err)
		}
	}
	s, _ := newRedis(t, nodes[0].URL())
	if err := state.Upgrade(ctx, s, quietLog); err != nil {
		t.Fatalf("upgrade: %v", err)
	}
	for i := range n {
		if _, err := s.GetOperation(ctx, fmt.Sprintf("op-%d", i)); err != nil {
			t.Fatalf("operation op-%d not copied: %v", i, err)
		}
	}
}

func equalRevs(a, b map[string]uint64) bool {
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return len(a) == len(b)
}
