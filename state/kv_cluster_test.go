package state_test

import (
	"context"
	"errors"
	"log/slog"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/state"
	"github.com/volumed/volumed/stores/storetest"
)

// TestKVSetupWhileClusterForms: a store started on the first server of a
// three-server cluster, before the others are up (no meta leader, so its
// requests go unanswered), is set up once they join, with three replicas.
func TestKVSetupWhileClusterForms(t *testing.T) {
	const n = 3
	c := testenv.NewJSCluster(t, n)
	c.Start(0)
	_, js := c.Connect(0)
	logs := &testenv.Buffer{}
	type result struct {
		kv  *state.KV
		err error
	}
	done := make(chan result, 1)
	bucket := nextBucket()
	go func() {
		kv, err := state.NewKV(context.Background(), js, state.KVConfig{Bucket: bucket, Replicas: n,
			Logger: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))})
		done <- result{kv, err}
	}()
	testenv.Eventually(t, 30*time.Second, func() bool { return strings.Contains(logs.String(), "jetstream not ready yet") },
		"a setup attempt failing on the lone server")
	for i := 1; i < n; i++ {
		c.Start(i)
	}
	var r result
	select {
	case r = <-done:
	case <-time.After(90 * time.Second):
		t.Fatalf("store not set up 90s after the cluster was complete:\n%s", logs.String())
	}
	if r.err != nil {
		t.Fatalf("store on a forming cluster: %v\n%s", r.err, logs.String())
	}
	defer r.kv.Close(context.Background())
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := r.kv.Ping(ctx); err != nil {
		t.Fatalf("ping: %v", err)
	}
	s, err := js.Stream(ctx, "KV_"+bucket)
	if err != nil {
		t.Fatal(err)
	}
	if info := s.CachedInfo(); info.Config.Replicas != n || info.Cluster == nil || len(info.Cluster.Replicas) != n-1 {
		t.Fatalf("bucket stream: replicas %d, cluster %+v; want %d on the cluster", info.Config.Replicas, info.Cluster, n)
	}
	if s.CachedInfo().Config.AllowDirect {
		t.Fatal("direct gets on a replicated bucket: a follower would answer reads")
	}
}

// TestKVWatcherOutlivesItsServer: the server holding a store's watcher
// (an R1 consumer on any member) goes away while the store's own server,
// the meta leader and the bucket's leader stay; a write another store
// makes is in the first store's lists within a few seconds (the missing
// heartbeats are noticed and the watcher goes on from another member),
// not after the 10 to 20 s a push consumer takes to notice.
func TestKVWatcherOutlivesItsServer(t *testing.T) {
	const n = 3
	// The bucket is made through the meta leader, which leads it too.
	c, js := testenv.StartJSCluster(t, n)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	bucket := nextBucket()
	stream := "KV_" + bucket
	open := func() *state.KV {
		kv, err := state.NewKV(ctx, js, state.KVConfig{Bucket: bucket, Replicas: n})
		if err != nil {
			t.Fatalf("new kv store: %v", err)
		}
		return kv
	}
	// Open the store until its watcher is on another member than the
	// leaders of the cluster and of the bucket (each try places it on one
	// of the three at random).
	var a *state.KV
	victim := -1
	for try := 0; victim < 0; try++ {
		if try == 30 {
			t.Fatal("the watcher was never placed off the leaders")
		}
		a = open()
		// A consumer just made may be missing from the list for a
		// moment (its member has not answered the listing yet).
		var hosts map[string]string
		testenv.Eventually(t, 10*time.Second, func() bool {
			hosts = testenv.Consumers(ctx, t, js, stream)
			return len(hosts) > 0
		}, "a consumer of %s", stream)
		if len(hosts) != 1 {
			t.Fatalf("consumers of %s on %v, want the watcher alone", stream, hosts)
		}
		for _, host := range hosts {
			victim = c.Bystander(host, stream)
		}
		if victim >= 0 {
			break
		}
		_ = a.Close(ctx)
		s, err := js.Stream(ctx, stream)
		if err != nil {
			t.Fatal(err)
		}
		for info := range s.ListConsumers(ctx).Info() {
			_ = js.DeleteConsumer(ctx, stream, info.Name)
		}
		// A deleted consumer may still be listed for a moment: the next
		// try counts its own alone.
		testenv.Eventually(t, 10*time.Second, func() bool { return len(testenv.Consumers(ctx, t, js, stream)) == 0 },
			"the consumers of %s deleted", stream)
	}
	defer a.Close(context.Background())
	b := newKV(t, js, bucket)

	c.Srvs[victim].Shutdown()
	c.Srvs[victim].WaitForShutdown()
	killed := time.Now()
	op := storetest.Op(1, commands.OpCreate, commands.StatusPending, "vol-1", "", time.Now())
	if _, err := b.CreateOperation(ctx, op); err != nil {
		t.Fatalf("write on the survivors: %v", err)
	}
	const within = 8 * time.Second
	lctx, lcancel := context.WithDeadline(ctx, killed.Add(within))
	defer lcancel()
	ops, _, err := a.ListOperations(lctx, state.Filter{})
	if err != nil || len(ops) != 1 || ops[0].ID != op.ID {
		t.Fatalf("the other store's write, %v after its watcher's server went: %v %v (want it within %v)",
			time.Since(killed).Round(time.Millisecond), ops, err, within)
	}
	t.Logf("seen %v after the watcher's server went", time.Since(killed).Round(time.Millisecond))
}

// TestKVUpgradeWaitsForQuorum: a start on a bucket of a release from
// before formats were recorded, whose format NewKV reads and records,
// waits while the bucket has no quorum (the two other members
// restarting, its leader among them) and records it once they are back,
// instead of failing the start.
func TestKVUpgradeWaitsForQuorum(t *testing.T) {
	c, _ := testenv.StartJSCluster(t, clusterSize)
	bucket := nextBucket()
	setup, _ := openMember(t, c, 0, bucket, "")
	if err := setup.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	old, err := jsOf(t, c, 0).KeyValue(context.Background(), bucket)
	if err != nil {
		t.Fatal(err)
	}
	if err := old.Purge(context.Background(), "meta.format"); err != nil {
		t.Fatal(err)
	}
	// The member that stays leads neither the cluster nor the bucket.
	survivor := c.AnyBystander("KV_" + bucket)
	_, js := c.Connect(survivor)
	logs := &logBuffer{}
	c.StopAllBut(survivor)
	done := make(chan error, 1)
	go func() {
		s, err := state.NewKV(context.Background(), js, state.KVConfig{Bucket: bucket, Replicas: clusterSize,
			Logger: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))})
		if err == nil {
			t.Cleanup(func() { _ = s.Close(context.Background()) })
		}
		done <- err
	}()
	c.OutlastOutage(survivor, logs, done)
	kv, err := jsOf(t, c, survivor).KeyValue(context.Background(), bucket)
	if err != nil {
		t.Fatal(err)
	}
	// A stream leader just elected can answer a read with what it held
	// before the last write for a moment.
	testenv.Eventually(t, 10*time.Second, func() bool {
		e, err := kv.Get(context.Background(), "meta.format")
		return err == nil && string(e.Value()) == strconv.Itoa(state.KVFormat)
	}, "format %d recorded", state.KVFormat)
}

// TestKVReadAfterElectionNeverOlder: a member of the bucket's stream
// that missed a write acknowledged to another member's store, and then
// knows no leader of the stream (its two other replicas are down, the
// cluster's JetStream still has a quorum of five), answers a stream info
// request with its own older state. Its store's reads, lists (the read
// barrier) and reads by key alike, then fail with ErrUnavailable or give
// the acknowledged record, never the one before it.
func TestKVReadAfterElectionNeverOlder(t *testing.T) {
	const members, replicas = 5, 3
	c, _ := testenv.StartJSCluster(t, members)
	bucket := nextBucket()
	stream := "KV_" + bucket
	w, _ := openLogged(t, jsOf(t, c, 0), state.KVConfig{Bucket: bucket, Replicas: replicas})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	info, err := jsOf(t, c, 0).Stream(ctx, stream)
	if err != nil {
		t.Fatal(err)
	}
	index := func(name string) int {
		for i, s := range c.Srvs {
			if s.Name() == name {
				return i
			}
		}
		t.Fatalf("no member %q", name)
		return -1
	}
	// behind: a replica that leads no stream and holds no writer; others:
	// the stream's two other replicas.
	ci := info.CachedInfo().Cluster
	behind, others := -1, []int{index(ci.Leader)}
	for _, r := range ci.Replicas {
		if i := index(r.Name); behind < 0 && i != 0 {
			behind = i
		} else {
			others = append(others, i)
		}
	}
	if behind < 0 || len(others) != replicas-1 {
		t.Fatalf("replicas of %s: %+v", stream, ci)
	}
	// Its store's client knows that member alone (as a volumed member's
	// does), so it reads nothing while the member is down.
	_, sjs := c.Connect(behind, nats.IgnoreDiscoveredServers())
	s, _ := openLogged(t, sjs, state.KVConfig{Bucket: bucket, Replicas: replicas})
	op, err := w.CreateOperation(ctx, storetest.Op(1, commands.OpCreate, commands.StatusPending, "vol-1", "", time.Now()))
	if err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 10*time.Second, func() bool {
		ops, _, err := s.ListOperations(ctx, state.Filter{})
		return err == nil && len(ops) == 1 && ops[0].Revision == op.Revision
	}, "the first record in the other store")

	c.Srvs[behind].Shutdown()
	c.Srvs[behind].WaitForShutdown()
	op.Status = commands.StatusExecuting
	acked, err := w.UpdateOperation(ctx, op)
	if err != nil {
		t.Fatalf("write on the two others: %v", err)
	}
	for _, i := range others {
		c.Srvs[i].Shutdown()
		c.Srvs[i].WaitForShutdown()
	}
	c.Start(behind)
	// The premise: knowing no leader, the member answers with what it
	// holds, which lacks the acknowledged write.
	js := jsOf(t, c, behind)
	testenv.Eventually(t, time.Minute, func() bool {
		rctx, rcancel := context.WithTimeout(ctx, 2*time.Second)
		defer rcancel()
		raw, err := js.Stream(rctx, stream)
		if err != nil {
			return false
		}
		info := raw.CachedInfo()
		return info.Cluster != nil && info.Cluster.Leader == "" && info.State.LastSeq < acked.Revision
	}, "a leaderless answer without the acknowledged write")
	check := func(what string, got commands.Operation, err error) {
		t.Helper()
		switch {
		case err != nil && !errors.Is(err, state.ErrUnavailable):
			t.Fatalf("%s without a leader: %v, want ErrUnavailable", what, err)
		case err == nil && got.Revision != acked.Revision:
			t.Fatalf("%s without a leader: revision %d (%s), older than the acknowledged %d",
				what, got.Revision, got.Status, acked.Revision)
		}
	}
	for range 3 {
		rctx, rcancel := context.WithTimeout(ctx, 2*time.Second)
		ops, _, err := s.ListOperations(rctx, state.Filter{})
		rcancel()
		var got commands.Operation
		if err == nil {
			if len(ops) != 1 {
				t.Fatalf("list without a leader: %v", ops)
			}
			got = ops[0]
		}
		check("list", got, err)
		rctx, rcancel = context.WithTimeout(ctx, 2*time.Second)
		got, err = s.GetOperation(rctx, op.ID)
		rcancel()
		check("read", got, err)
	}

	// With the other replicas back, the store reads the acknowledged record.
	for _, i := range others {
		c.Start(i)
	}
	testenv.Eventually(t, time.Minute, func() bool {
		rctx, rcancel := context.WithTimeout(ctx, 2*time.Second)
		defer rcancel()
		ops, _, err := s.ListOperations(rctx, state.Filter{})
		return err == nil && len(ops) == 1 && ops[0].Revision == acked.Revision
	}, "the acknowledged record listed once a leader is back")
}
