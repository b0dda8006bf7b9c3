package state_test

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/state"
	"github.com/volumed/volumed/stores/storetest"
)

// clusterSize is the members of the cluster tests of the index cache.
const clusterSize = 3

// openMember opens a store with the index cache path on member i of c,
// connected to that member's server only, as a volumed member is.
func openMember(t *testing.T, c *testenv.JSCluster, i int, bucket, path string) (*state.KV, *logBuffer) {
	t.Helper()
	_, js := c.Connect(i)
	return openLogged(t, js, state.KVConfig{Bucket: bucket, Replicas: clusterSize, IndexCache: path})
}

// restartMember closes member i's store s, stops the member's server,
// runs meanwhile while it is down, starts it again and opens a store on
// it with the cache path.
func restartMember(t *testing.T, c *testenv.JSCluster, i int, s *state.KV, bucket, path string, meanwhile func()) (*state.KV, *logBuffer) {
	t.Helper()
	if err := s.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("no cache after Close: %v", err)
	}
	name := c.Srvs[i].Name()
	c.Srvs[i].Shutdown()
	c.Srvs[i].WaitForShutdown()
	// The others elect a leader of the bucket if it was the member's.
	waitLeader(t, c, (i+1)%clusterSize, bucket, name)
	if meanwhile != nil {
		meanwhile()
	}
	c.Start(i)
	waitLeader(t, c, i, bucket, "")
	return openMember(t, c, i, bucket, path)
}

// waitLeader waits until member i sees a leader of the bucket's stream,
// other than the member named not, with a quorum of current replicas
// (a start does not wait for one yet in every request), and routes the
// bucket's writes to it: a member just started learns the leader's
// interest after it answers requests, and a write before that has no
// responders.
func waitLeader(t *testing.T, c *testenv.JSCluster, i int, bucket, not string) {
	t.Helper()
	js := jsOf(t, c, i)
	testenv.Eventually(t, time.Minute, func() bool {
		if !c.Srvs[i].GlobalAccount().SubscriptionInterest("$KV." + bucket + ".op.any") {
			return false
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		st, err := js.Stream(ctx, "KV_"+bucket)
		if err != nil {
			return false
		}
		info, err := st.Info(ctx)
		if err != nil || info.Cluster == nil || info.Cluster.Leader == "" || info.Cluster.Leader == not {
			return false
		}
		current := 1
		for _, r := range info.Cluster.Replicas {
			if r.Current && !r.Offline {
				current++
			}
		}
		return current > clusterSize/2
	}, "a leader of the bucket with a quorum, not %q, and its interest", not)
}

// cacheUsed reports whether a store's log says it started on its cache.
func cacheUsed(logs *logBuffer) bool { return strings.Contains(logs.String(), "index cache loaded") }

// seals returns the subjects of the bucket's cache seals and the
// Nats-TTL header of each.
func seals(ctx context.Context, t *testing.T, js jetstream.JetStream, bucket string) map[string]string {
	t.Helper()
	st, err := js.Stream(ctx, "KV_"+bucket)
	if err != nil {
		t.Fatal(err)
	}
	info, err := st.Info(ctx, jetstream.WithSubjectFilter("$KV."+bucket+".meta.cache.>"))
	if err != nil {
		t.Fatal(err)
	}
	ttls := map[string]string{}
	for subj := range info.State.Subjects {
		msg, err := st.GetLastMsgForSubject(ctx, subj)
		if err != nil {
			t.Fatal(err)
		}
		ttls[subj] = msg.Header.Get(jetstream.MsgTTLHeader)
	}
	return ttls
}

// TestKVIndexCacheCluster: a cluster member (three replicas) restarted on
// its index cache lists, counts and indexes exactly what a store reading
// every record does, also when another member wrote or pruned while it
// was down; a cache it cannot trust (its seal gone, an earlier file of
// its own) makes it read every record.
func TestKVIndexCacheCluster(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	c, _ := testenv.StartJSCluster(t, clusterSize)
	for _, tc := range []struct {
		name string
		// meanwhile runs while member 0 is down, on a store of member 1
		// (no cache), with member 0's cache path.
		meanwhile func(t *testing.T, other *state.KV, path, bucket string)
		used      bool
	}{
		{name: "clean restart", used: true},
		{name: "a write by another member while down", used: true, meanwhile: func(t *testing.T, o *state.KV, _, _ string) {
			changeWhileStopped(ctx, t, o)
		}},
		{name: "a prune by another member while down", used: true, meanwhile: func(t *testing.T, o *state.KV, _, _ string) {
			// A prune reads the store's memory as it is, whose watcher
			// may not have applied member 0's writes yet (a loaded
			// machine): a read waits until it has.
			if _, err := o.Stats(ctx); err != nil {
				t.Fatal(err)
			}
			if n, err := o.PruneOperations(ctx, time.Now().Add(time.Hour), 5); err != nil || n != 5 {
				t.Fatalf("pruned %d: %v", n, err)
			}
			if err := o.DeleteOperation(ctx, storetest.ID(7), 0); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "its seal gone", meanwhile: func(t *testing.T, _ *state.KV, _, bucket string) {
			s, err := jsOf(t, c, 1).Stream(ctx, "KV_"+bucket)
			if err != nil {
				t.Fatal(err)
			}
			if err := s.Purge(ctx, jetstream.WithPurgeSubject("$KV."+bucket+".meta.cache.>")); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "an earlier file of its own", meanwhile: func(t *testing.T, _ *state.KV, path, bucket string) {
			// The member's data dir restored from a copy taken before its
			// last run: that run's seal replaced the copy's.
			old, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			s, logs := openMember(t, c, 1, bucket, path)
			if !cacheUsed(logs) {
				t.Fatalf("cache not used by the run after the copy; log:\n%s", logs)
			}
			if err := s.Close(ctx); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(path, old, 0o600); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bucket, path := nextBucket(), filepath.Join(t.TempDir(), "state-index.cache")
			s0, _ := openMember(t, c, 0, bucket, path)
			other, _ := openMember(t, c, 1, bucket, "")
			fillCacheTest(t, s0)
			s0, logs := restartMember(t, c, 0, s0, bucket, path, func() {
				if tc.meanwhile != nil {
					tc.meanwhile(t, other, path, bucket)
				}
			})
			if used := cacheUsed(logs); used != tc.used {
				t.Fatalf("cache used %v, want %v; log:\n%s", used, tc.used, logs)
			}
			full := newClusterKV(t, c, 2, bucket)
			sameState(t, s0, full)

			// The revisions loaded are the records': a write on one wins,
			// and the other members see it.
			ops, _, err := s0.ListOperations(ctx, state.Filter{Status: commands.StatusPending, Limit: 1})
			if err != nil || len(ops) != 1 {
				t.Fatalf("a pending operation: %v, %v", ops, err)
			}
			ops[0].Status = commands.StatusExecuting
			if _, err := s0.UpdateOperation(ctx, ops[0]); err != nil {
				t.Fatalf("update on the loaded revision: %v", err)
			}
			sameState(t, s0, full)
			sameState(t, other, full)

			// And the cache written by that store is used at its next
			// start.
			s0, logs = restartMember(t, c, 0, s0, bucket, path, nil)
			if !cacheUsed(logs) {
				t.Fatalf("the cache written after that start is not used; log:\n%s", logs)
			}
			sameState(t, s0, full)

			// A member's seals expire (so that those of members gone for
			// good do not pile up), and a start on its cache keeps its
			// seal key: its next seal replaces its last.
			if err := s0.Close(ctx); err != nil {
				t.Fatal(err)
			}
			js := jsOf(t, c, 2)
			before := seals(ctx, t, js, bucket)
			s0, logs = openMember(t, c, 0, bucket, path)
			if !cacheUsed(logs) {
				t.Fatalf("cache not used; log:\n%s", logs)
			}
			if err := s0.Close(ctx); err != nil {
				t.Fatal(err)
			}
			after := seals(ctx, t, js, bucket)
			if len(after) != len(before) || len(after) == 0 {
				t.Fatalf("seals %v after a start on the cache, %v before", after, before)
			}
			for subj, ttl := range after {
				if ttl != (13 * time.Hour).String() {
					t.Fatalf("seal %s: TTL %q, want 13h", subj, ttl)
				}
			}
		})
	}
}

// jsOf is a JetStream client on member i of c.
func jsOf(t *testing.T, c *testenv.JSCluster, i int) jetstream.JetStream {
	t.Helper()
	_, js := c.Connect(i)
	return js
}

// TestKVIndexCacheClusterSamePath: two members whose index caches have
// the same path on their own hosts (each file moved aside while the other
// member runs, as on two machines with the same host name) do not spoil
// each other's cache: each restarts on its own, and each keeps one seal.
func TestKVIndexCacheClusterSamePath(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c, _ := testenv.StartJSCluster(t, clusterSize)
	bucket, dir := nextBucket(), t.TempDir()
	path := filepath.Join(dir, "state-index.cache")
	host := func(i int) string { return filepath.Join(dir, fmt.Sprintf("host%d", i)) }
	// run opens a store on member i with its host's file at path, runs fn
	// on it, closes it and puts the file back on its host.
	run := func(i int, fn func(s *state.KV, logs *logBuffer)) {
		if err := os.Rename(host(i), path); err != nil && !os.IsNotExist(err) {
			t.Fatal(err)
		}
		s, logs := openMember(t, c, i, bucket, path)
		fn(s, logs)
		if err := s.Close(ctx); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(path, host(i)); err != nil {
			t.Fatalf("no cache after Close: %v", err)
		}
	}
	run(0, func(s *state.KV, _ *logBuffer) { fillCacheTest(t, s) })
	run(1, func(s *state.KV, _ *logBuffer) {
		if _, err := s.CreateOperation(ctx, storetest.Op(200, commands.OpCreate, commands.StatusPending, "vol-4", "", time.Now())); err != nil {
			t.Fatal(err)
		}
	})
	for round := range 2 {
		for i := range 2 {
			run(i, func(s *state.KV, logs *logBuffer) {
				if !cacheUsed(logs) {
					t.Fatalf("round %d, member %d: cache not used; log:\n%s", round, i, logs)
				}
				sameState(t, s, newClusterKV(t, c, 2, bucket))
			})
		}
	}
	if got := seals(ctx, t, jsOf(t, c, 2), bucket); len(got) != 2 {
		t.Fatalf("seals %v, want one per member", got)
	}
}

// newClusterKV opens a store without a cache on member i of c.
func newClusterKV(t *testing.T, c *testenv.JSCluster, i int, bucket string) *state.KV {
	t.Helper()
	s, _ := openMember(t, c, i, bucket, "")
	return s
}

var clusterRestartOps = flag.Int("cluster-restart-ops", 20_000, "terminal operations BenchmarkKVClusterRestart records")

// BenchmarkKVClusterRestart measures a member restart in a three-member
// cluster holding -cluster-restart-ops terminal operations: from its
// server's start to its store's (its server recovering the bucket, the
// store loading its index), on its index cache and reading every record.
func BenchmarkKVClusterRestart(b *testing.B) {
	c := testenv.NewJSCluster(b, clusterSize)
	for i := range clusterSize {
		c.Start(i)
	}
	ctx := context.Background()
	bucket := nextBucket()
	open := func(path string) (*state.KV, *logBuffer) {
		_, js := c.Connect(0)
		return openLogged(b, js, state.KVConfig{Bucket: bucket, Replicas: clusterSize, IndexCache: path})
	}
	s, _ := open("")
	var next atomic.Int64
	var wg sync.WaitGroup
	now := time.Now()
	for range 32 {
		wg.Go(func() {
			for n := int(next.Add(1)); n <= *clusterRestartOps; n = int(next.Add(1)) {
				op := storetest.Op(n, commands.OpAttach, commands.StatusCompleted, fmt.Sprintf("vol-%d", n%10_000),
					fmt.Sprintf("vm-%d", n%1_000), now.Add(-time.Duration(n)*time.Second))
				op.CompletedAt = &op.CreatedAt
				if _, err := s.CreateOperation(ctx, op); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	if b.Failed() {
		b.FailNow()
	}
	_ = s.Close(ctx)
	path := filepath.Join(b.TempDir(), "state-index.cache")
	for _, bc := range []struct{ name, path string }{{"cache", path}, {"every record", ""}} {
		b.Run(bc.name, func(b *testing.B) {
			s, _ := open(bc.path)
			_ = s.Close(ctx) // writes the cache
			for b.Loop() {
				b.StopTimer()
				c.Srvs[0].Shutdown()
				c.Srvs[0].WaitForShutdown()
				b.StartTimer()
				c.Start(0)
				s, logs := open(bc.path)
				b.StopTimer()
				if cacheUsed(logs) != (bc.path != "") {
					b.Fatalf("cache used %v; log:\n%s", cacheUsed(logs), logs)
				}
				if st, err := s.Stats(ctx); err != nil || st.Total != int64(*clusterRestartOps) {
					b.Fatalf("stats %+v, %v; want %d operations", st, err, *clusterRestartOps)
				}
				_ = s.Close(ctx)
				b.StartTimer()
			}
			b.ReportMetric(float64(*clusterRestartOps), "operations")
		})
	}
}

// TestKVIndexCacheClusterNoQuorum: the member stopped last, the others
// gone, does not wait out its stop's time for a cache it cannot seal: it
// keeps the cache it wrote before, and starts on it once the others are
// back.
func TestKVIndexCacheClusterNoQuorum(t *testing.T) {
	c, _ := testenv.StartJSCluster(t, clusterSize)
	bucket, path := nextBucket(), filepath.Join(t.TempDir(), "state-index.cache")
	s0, _ := openMember(t, c, 0, bucket, path)
	fillCacheTest(t, s0)
	if err := s0.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	s0, logs := openMember(t, c, 0, bucket, path)
	if !cacheUsed(logs) {
		t.Fatalf("cache not used; log:\n%s", logs)
	}
	for _, i := range []int{1, 2} {
		c.Srvs[i].Shutdown()
		c.Srvs[i].WaitForShutdown()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := s0.Close(ctx); err != nil || ctx.Err() != nil {
		t.Fatalf("close without a quorum: %v, its time %v; log:\n%s", err, ctx.Err(), logs)
	}
	if !strings.Contains(logs.String(), "index cache not written") {
		t.Fatalf("no word of the cache not written; log:\n%s", logs)
	}
	for _, i := range []int{1, 2} {
		c.Start(i)
	}
	waitLeader(t, c, 0, bucket, "")
	s0, logs = openMember(t, c, 0, bucket, path)
	if !cacheUsed(logs) {
		t.Fatalf("the cache written before is not used; log:\n%s", logs)
	}
	sameState(t, s0, newClusterKV(t, c, 1, bucket))
}
