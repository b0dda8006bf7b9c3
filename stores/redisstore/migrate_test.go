package redisstore_test

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/state"
	"github.com/volumed/volumed/stores/redisstore"
	"github.com/volumed/volumed/stores/storetest"
)

// writeFormat1 records ops as the Redis store of 10bb206 did (format 1,
// not recorded: no requester index): each record hash, its index zsets
// and the counters.
func writeFormat1(t *testing.T, rdb *redis.Client, p string, ops []commands.Operation) {
	t.Helper()
	ctx := context.Background()
	for i, op := range ops {
		data, err := json.Marshal(op)
		if err != nil {
			t.Fatal(err)
		}
		score := float64(op.CreatedAt.UnixMicro())
		pipe := rdb.TxPipeline()
		pipe.HSet(ctx, p+"op:"+op.ID, "j", data, "v", i+1)
		for _, idx := range []string{"all", "type:" + string(op.Type), "status:" + string(op.Status),
			"volume:" + op.VolumeID, "vm:" + op.VM()} {
			if idx != "vm:" {
				pipe.ZAdd(ctx, p+"ops:"+idx, redis.Z{Score: score, Member: op.ID})
			}
		}
		pipe.HIncrBy(ctx, p+"ops:stats", "total", 1)
		pipe.HIncrBy(ctx, p+"ops:stats", "type:"+string(op.Type), 1)
		pipe.HIncrBy(ctx, p+"ops:stats", "status:"+string(op.Status), 1)
		pipe.Set(ctx, p+"rev", i+1, 0)
		if _, err := pipe.Exec(ctx); err != nil {
			t.Fatal(err)
		}
	}
}

// TestRedisUpgradeIndexesRequesters: records written in format 1 (by
// 10bb206, which recorded no format), some with a requester, are found by
// requester once Upgrade ran; format 2 is recorded, and running it again
// (or again after a start that died before recording it) changes
// nothing.
func TestRedisUpgradeIndexesRequesters(t *testing.T) {
	r := testenv.StartRedis(t)
	rdb := redis.NewClient(&redis.Options{Addr: r.Addr})
	defer rdb.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	const p = "{migrate}:"
	var ops []commands.Operation
	for n := 1; n <= 2500; n++ { // more than one SCAN batch
		op := storetest.Op(n, commands.OpAttach, commands.StatusPending, fmt.Sprintf("vol-%d", n%3), "vm-1",
			time.Date(2026, 3, 1, 0, 0, n, 0, time.UTC))
		if n%2 == 0 {
			op.RequestedBy = "api-token:alice@127.0.0.1"
		}
		ops = append(ops, op)
	}
	writeFormat1(t, rdb, p, ops)
	var want []string
	for _, op := range slices.Backward(ops) {
		if op.RequestedBy != "" {
			want = append(want, op.ID)
		}
	}
	open := func() *redisstore.Store {
		s, err := redisstore.New(ctx, redisstore.Config{URL: r.URL(), Prefix: p, Logger: quietLog})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = s.Close(context.Background()) })
		if err := state.Upgrade(ctx, s, quietLog); err != nil {
			t.Fatal(err)
		}
		return s
	}
	check := func(s *redisstore.Store) {
		t.Helper()
		got, _, err := s.ListOperations(ctx, state.Filter{RequestedBy: "api-token:alice@127.0.0.1"})
		if err != nil {
			t.Fatal(err)
		}
		if ids := storetest.IDs(got); !slices.Equal(ids, want) {
			t.Fatalf("by requester: %d operations, want %d", len(ids), len(want))
		}
		if n, err := rdb.ZCard(ctx, p+"ops:by:api-token:alice@127.0.0.1").Result(); err != nil || n != int64(len(want)) {
			t.Fatalf("requester index holds %d, %v; want %d", n, err, len(want))
		}
		if v, err := rdb.Get(ctx, p+"format").Result(); err != nil || v != "2" {
			t.Fatalf("format %q, %v", v, err)
		}
		st, err := s.Stats(ctx)
		if err != nil || st.Total != int64(len(ops)) {
			t.Fatalf("stats %+v, %v", st, err)
		}
		page, _, err := s.ListOperations(ctx, state.Filter{VolumeID: "vol-1", Limit: 1})
		if err != nil || len(page) != 1 || page[0].ID != ops[2499].ID {
			t.Fatalf("old index: %v, %v", storetest.IDs(page), err)
		}
	}
	check(open())
	check(open()) // recorded: nothing to do
	if err := rdb.Set(ctx, p+"format", "1", 0).Err(); err != nil {
		t.Fatal(err)
	}
	check(open()) // a start that died before recording format 2: done again, the same
	// An operation updated since it was read is left to its writer:
	// the migration adds it on the revision it read, or not at all.
	s := open()
	got, err := s.GetOperation(ctx, ops[1].ID)
	if err != nil {
		t.Fatal(err)
	}
	got.Status = commands.StatusExecuting
	if _, err := s.UpdateOperation(ctx, got); err != nil {
		t.Fatal(err)
	}
	if _, err := rdb.ZScore(ctx, p+"ops:by:"+got.RequestedBy, got.ID).Result(); err != nil {
		t.Fatalf("an updated operation left its requester index: %v", err)
	}
}
