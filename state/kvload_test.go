package state_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	busRole "github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/state"
	"github.com/volumed/volumed/stores/storetest"
)

var (
	fullReadOps = flag.Int("fullread.ops", 100_000, "operations BenchmarkKVFullRead writes before reading them")
	fullReadDir = flag.String("fullread.dir", "", "BenchmarkKVFullRead's data dir, kept to be read again by the next run "+
		"(with the same -fullread.ops); default a temporary one")
)

// benchOp is the i-th operation of bench/scale's history over 10,000
// volumes, 1,000 VMs and 20 requesters, created 2.5 s apart from base.
func benchOp(i int, base time.Time) commands.Operation {
	return storetest.History{Volumes: 10_000, VMs: 1_000, Callers: 20, Start: base, Step: 2500 * time.Millisecond}.Op(i)
}

// fillBucket writes n operations into bucket as a store's creates do (a
// put expecting no earlier revision of the key), many in flight at once.
func fillBucket(b testing.TB, js jetstream.JetStream, bucket string, n int) {
	b.Helper()
	fillOps(b, js, bucket, 0, n)
}

// fillOps writes operations from to to-1 of the history into bucket as
// fillBucket does.
func fillOps(b testing.TB, js jetstream.JetStream, bucket string, from, to int) {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	base := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for i := from; i < to; i++ {
		op := benchOp(i, base)
		data, err := json.Marshal(op)
		if err != nil {
			b.Fatal(err)
		}
		_, err = js.PublishAsync("$KV."+bucket+".op."+op.ID, data, jetstream.WithExpectLastSequencePerSubject(0))
		if errors.Is(err, jetstream.ErrTooManyStalledMsgs) {
			// A replicated stream is slower to answer: let it catch up.
			select {
			case <-js.PublishAsyncComplete():
			case <-ctx.Done():
				b.Fatal(ctx.Err())
			}
			i--
			continue
		}
		if err != nil {
			b.Fatal(err)
		}
	}
	select {
	case <-js.PublishAsyncComplete():
	case <-ctx.Done():
		b.Fatal(ctx.Err())
	}
}

// BenchmarkKVFullRead times a start without an index cache: NewKV on a
// bucket of -fullread.ops operations (a bus restarted after writing them,
// so the server reads them from its files), reading every record.
func BenchmarkKVFullRead(b *testing.B) {
	dir := *fullReadDir
	if dir == "" {
		dir = b.TempDir()
	}
	bucket := fmt.Sprintf("fullread_%d", *fullReadOps)
	ctx := context.Background()
	if _, err := os.Stat(filepath.Join(dir, "filled-"+bucket)); err != nil {
		bus := testenv.StartBusIn(b, dir)
		s := newKV(b, bus.JetStream(), bucket)
		fillBucket(b, bus.JetStream(), bucket, *fullReadOps)
		_ = s.Close(ctx)
		_ = bus.Close(ctx)
		if err := os.WriteFile(filepath.Join(dir, "filled-"+bucket), nil, 0o600); err != nil {
			b.Fatal(err)
		}
	}
	bus := testenv.StartBusIn(b, dir)
	cpu0 := cpuTime(b)
	b.ResetTimer()
	for range b.N {
		s, err := state.NewKV(ctx, bus.JetStream(), state.KVConfig{Bucket: bucket})
		if err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		st, err := s.Stats(ctx)
		if err != nil || st.Total != int64(*fullReadOps) {
			b.Fatalf("read %d operations (%v), want %d", st.Total, err, *fullReadOps)
		}
		_ = s.Close(ctx)
		b.StartTimer()
	}
	b.ReportMetric(float64(*fullReadOps)*float64(b.N)/b.Elapsed().Seconds(), "records/s")
	// The process's CPU (the server's included, and the checks between
	// the reads): less at the mercy of a shared machine than the time.
	b.ReportMetric((cpuTime(b)-cpu0).Seconds()/float64(b.N), "cpu-s/op")
}

// cpuTime is the CPU time this process has used.
func cpuTime(b testing.TB) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// fullReadFilters are listings of benchOp's history compared after a
// full read, beside cacheFilters.
var fullReadFilters = []state.Filter{
	{VolumeID: "00000001-0000-4000-8000-000000000007"}, {VMID: benchVM()},
	{RequestedBy: "api-token:bench-3@127.0.0.1"}, {Status: commands.StatusFailed, Type: commands.OpAttach},
	{Limit: 7},
}

// benchVM is a VM of benchOp's history.
func benchVM() string {
	for i := 0; ; i++ {
		if op := benchOp(i, time.Time{}); op.VMID != nil {
			return *op.VMID
		}
	}
}

// sameFullRead fails unless got (a store that read every record) holds
// what want does: the same counts, mappings and exports, and the same
// first page and a deep one of each listing of cacheFilters and
// fullReadFilters (not every record: reading them all takes long).
func sameFullRead(t *testing.T, got, want state.Store) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	sameCounts(ctx, t, got, want)
	for _, f := range append(slices.Clone(cacheFilters), fullReadFilters...) {
		f.Cursor = ""
		if f.Limit == 0 {
			f.Limit = 20
		}
		for page := range 4 {
			g, gnext, gerr := got.ListOperations(ctx, f)
			w, wnext, werr := want.ListOperations(ctx, f)
			if gerr != nil || werr != nil || !reflect.DeepEqual(g, w) || gnext != wnext {
				t.Errorf("list %+v: got %v (%v), want %v (%v)", f, storetest.IDs(g), gerr, storetest.IDs(w), werr)
			}
			if wnext == "" {
				break
			}
			// Deeper: the fourth page is many pages down.
			f.Cursor = wnext
			if page == 1 {
				_, f.Cursor, _ = want.ListOperations(ctx, state.Filter{Type: f.Type, Status: f.Status,
					VolumeID: f.VolumeID, VMID: f.VMID, RequestedBy: f.RequestedBy, Limit: 1000, Cursor: wnext})
			}
			if f.Cursor == "" {
				break
			}
		}
	}
}

// writeWhile creates, deletes and updates operations through s until
// stop is closed, and returns how many writes it made.
func writeWhile(t *testing.T, s *state.KV, from int, stop <-chan struct{}) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	base := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	n := 0
	for i := from; ; i++ {
		select {
		case <-stop:
			return n
		default:
		}
		op := benchOp(i, base)
		op.Status, op.CompletedAt = commands.StatusPending, nil
		created, err := s.CreateOperation(ctx, op)
		if err != nil {
			t.Error(err)
			return n
		}
		old, err := s.GetOperation(ctx, benchOp(i-from, base).ID)
		if err != nil {
			t.Error(err)
			return n
		}
		if i%2 == 0 {
			err = s.DeleteOperation(ctx, old.ID, old.Revision)
		} else {
			created.Status = commands.StatusExecuting
			_, err = s.UpdateOperation(ctx, created)
		}
		if err != nil {
			t.Error(err)
			return n
		}
		n += 3
	}
}

// TestKVFullRead: a start reading every record (no index cache) lists,
// counts and holds what a store that indexed each record as it was
// written does, the writes made while it read included.
func TestKVFullRead(t *testing.T) {
	const ops = 20_000
	js := testenv.StartBus(t).JetStream()
	bucket := nextBucket()
	writer := newKV(t, js, bucket)
	fillCacheTest(t, writer)
	fillBucket(t, js, bucket, ops)
	stop := make(chan struct{})
	var writes int
	done := make(chan struct{})
	go func() {
		defer close(done)
		writes = writeWhile(t, writer, ops, stop)
	}()
	s, logs := openCached(t, js, bucket, "")
	close(stop)
	<-done
	if writes == 0 {
		t.Log("no write while reading")
	}
	st, err := s.Stats(context.Background())
	if err != nil || st.Total < ops {
		t.Fatalf("stats %+v, %v", st, err)
	}
	sameFullRead(t, s, writer)
	if strings.Contains(logs.String(), "records left to the watcher's reader") {
		t.Errorf("the first read did not read every record itself:\n%s", logs)
	}
}

// TestKVFullReadLeftToReader: when the first read's consumer goes in the
// middle (its cluster member gone), the watcher's reader goes on from
// the next record: the store still holds every record, once. (The test
// deletes the consumer as soon as it sees it, and tries again when the
// first read had ended by then.)
func TestKVFullReadLeftToReader(t *testing.T) {
	const ops = 50_000
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	js := testenv.StartBus(t).JetStream()
	bucket := nextBucket()
	writer := newKV(t, js, bucket)
	fillCacheTest(t, writer)
	fillBucket(t, js, bucket, ops)
	stream, err := js.Stream(ctx, "KV_"+bucket)
	if err != nil {
		t.Fatal(err)
	}
	for try := 0; ; try++ {
		if try == 5 {
			t.Fatal("the first read always ended before its consumer was deleted")
		}
		known := map[string]bool{}
		for name := range stream.ConsumerNames(ctx).Name() {
			known[name] = true
		}
		deleted := make(chan bool, 1)
		go func() {
			for ctx.Err() == nil {
				for name := range stream.ConsumerNames(ctx).Name() {
					if !known[name] {
						deleted <- stream.DeleteConsumer(ctx, name) == nil
						return
					}
				}
			}
			deleted <- false
		}()
		s, logs := openCached(t, js, bucket, "")
		if !<-deleted {
			t.Fatal("the first read's consumer was not deleted")
		}
		if !strings.Contains(logs.String(), "records left to the watcher's reader") {
			_ = s.Close(ctx)
			continue
		}
		st, err := s.Stats(ctx)
		if err != nil || st.Total != ops+29 {
			t.Fatalf("stats %+v, %v; want %d operations", st, err, ops+29)
		}
		sameFullRead(t, s, writer)
		return
	}
}

// BenchmarkKVFullReadCluster times a start without an index cache on a
// member of a three-member cluster (three replicas) holding -fullread.ops
// operations: NewKV on a member whose server runs, on the stream's
// leader and on a member that does not lead it, and on a member whose
// server restarts (timed from its start). It reports the CPU time of
// the process (the three servers') and the bytes the members received
// over their routes, per start.
func BenchmarkKVFullReadCluster(b *testing.B) {
	c := testenv.NewJSCluster(b, clusterSize)
	for i := range clusterSize {
		c.Start(i)
	}
	ctx := context.Background()
	bucket := nextBucket()
	_, js := c.Connect(0)
	s, _ := openLogged(b, js, state.KVConfig{Bucket: bucket, Replicas: clusterSize})
	fillBucket(b, js, bucket, *fullReadOps)
	_ = s.Close(ctx)
	for _, bc := range []struct {
		name            string
		leader, restart bool
	}{{"leader", true, false}, {"follower", false, false}, {"restarted", false, true}} {
		b.Run(bc.name, func(b *testing.B) {
			member := -1
			for i, srv := range c.Srvs {
				if srv.JetStreamIsStreamLeader(server.DEFAULT_GLOBAL_ACCOUNT, "KV_"+bucket) == bc.leader {
					member = i
				}
			}
			cpu0, routed := cpuTime(b), int64(0)
			for b.Loop() {
				if bc.restart {
					b.StopTimer()
					c.Srvs[member].Shutdown()
					c.Srvs[member].WaitForShutdown()
					b.StartTimer()
					c.Start(member)
				}
				// After a restart: the members' counts of their routes
				// to it start from zero.
				routed -= routeBytes(b, c)
				_, js := c.Connect(member)
				s, logs := openLogged(b, js, state.KVConfig{Bucket: bucket, Replicas: clusterSize})
				b.StopTimer()
				routed += routeBytes(b, c)
				if st, err := s.Stats(ctx); err != nil || st.Total != int64(*fullReadOps) {
					b.Fatalf("read %d operations (%v), want %d", st.Total, err, *fullReadOps)
				}
				if strings.Contains(logs.String(), "records left to the watcher's reader") {
					b.Logf("the first read did not read every record itself:\n%s", logs)
				}
				_ = s.Close(ctx)
				b.StartTimer()
			}
			b.ReportMetric(float64(*fullReadOps)*float64(b.N)/b.Elapsed().Seconds(), "records/s")
			b.ReportMetric((cpuTime(b)-cpu0).Seconds()/float64(b.N), "cpu-s/op")
			b.ReportMetric(float64(routed)/1e6/float64(b.N), "route-MB/op")
		})
	}
}

// routeBytes is what the members of c have received over their routes.
func routeBytes(b *testing.B, c *testenv.JSCluster) int64 {
	var n int64
	for _, srv := range c.Srvs {
		rz, err := srv.Routez(nil)
		if err != nil {
			b.Fatal(err)
		}
		for _, r := range rz.Routes {
			n += r.InBytes
		}
	}
	return n
}

// pullGate forwards one client connection to a NATS server and holds what
// the client sends from its second pull request (a consumer's second
// CONSUMER.MSG.NEXT) on, until open: the server then delivers no more
// than the first pull asked for.
type pullGate struct {
	ln       net.Listener
	open     chan struct{}
	openOnce sync.Once
	mu       sync.Mutex
	conns    []net.Conn // closed with the gate
}

// newPullGate listens on a loopback port for a client of the server at
// addr (host:port); closed when the test ends.
func newPullGate(t *testing.T, addr string) *pullGate {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := &pullGate{ln: ln, open: make(chan struct{})}
	t.Cleanup(func() {
		_ = ln.Close()
		g.release()
		g.mu.Lock()
		defer g.mu.Unlock()
		for _, c := range g.conns {
			_ = c.Close()
		}
	})
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial("tcp", addr)
			if err != nil {
				_ = c.Close()
				return
			}
			g.mu.Lock()
			g.conns = append(g.conns, c, s)
			g.mu.Unlock()
			go func() { _, _ = io.Copy(c, s) }()
			go g.forward(s, c)
		}
	}()
	return g
}

// URL is the gate's address for a NATS client.
func (g *pullGate) URL() string { return "nats://" + g.ln.Addr().String() }

// release forwards what was held, and everything after it.
func (g *pullGate) release() { g.openOnce.Do(func() { close(g.open) }) }

// forward copies from the client c to the server s, holding from the
// second pull request (the middle of its subject) until release.
func (g *pullGate) forward(s io.Writer, c io.Reader) {
	pull := []byte("CONSUMER.MSG.NEXT")
	var seen []byte // what came before the hold
	buf := make([]byte, 32<<10)
	for held := false; ; {
		n, err := c.Read(buf)
		if err != nil {
			return
		}
		chunk := buf[:n]
		if !held {
			before := len(seen)
			seen = append(seen, chunk...)
			if first := bytes.Index(seen, pull); first >= 0 {
				if i := bytes.Index(seen[first+1:], pull); i >= 0 {
					cut := max(first+1+i-before, 0)
					if _, err := s.Write(chunk[:cut]); err != nil {
						return
					}
					chunk, held = chunk[cut:], true
					<-g.open
				}
			}
		}
		if _, err := s.Write(chunk); err != nil {
			return
		}
	}
}

// TestKVFullReadLastRemoved: a start reading every record whose last
// record is removed without a new one while the read is under way (what
// a delete marker's TTL does when it runs out: the server removes the
// marker and writes nothing) ends all the same, once the records that are
// left are read. The store's first pull delivers every record but the
// last one, a delete marker; the gate holds its next pulls while the test
// removes the marker, as its TTL would.
func TestKVFullReadLastRemoved(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	bus := testenv.StartBus(t)
	js := bus.JetStream()
	bucket := nextBucket()
	// The test removes the marker by its sequence, as its TTL running
	// out would: the bucket's stream is made again, as the store makes
	// it but for the refusal of such deletes (which an update cannot
	// lift).
	made := newKV(t, js, bucket)
	_ = made.Close(ctx)
	stream, err := js.Stream(ctx, "KV_"+bucket)
	if err != nil {
		t.Fatal(err)
	}
	cfg := stream.CachedInfo().Config
	cfg.DenyDelete = false
	if err := js.DeleteStream(ctx, cfg.Name); err != nil {
		t.Fatal(err)
	}
	if stream, err = js.CreateStream(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	writer := newKV(t, js, bucket)
	// The first pull asks for kvLoadBatch (4,096) messages: the marker is
	// the 4,097th, after the format the writer recorded and the records.
	const first = 4096
	fillBucket(t, js, bucket, first-1)
	kv, err := js.KeyValue(ctx, bucket)
	if err != nil {
		t.Fatal(err)
	}
	if err := kv.Purge(ctx, "op.gone", jetstream.PurgeTTL(time.Hour)); err != nil {
		t.Fatal(err)
	}
	info, err := stream.Info(ctx)
	if err != nil || info.State.Msgs != first+1 {
		t.Fatalf("stream %+v, %v; want %d messages", info.State, err, first+1)
	}
	marker := info.State.LastSeq

	gate := newPullGate(t, strings.TrimPrefix(bus.ClientURL(), "nats://"))
	nc, err := nats.Connect(gate.URL(), nats.UserCredentials(bus.CredsFile(busRole.RoleDaemon)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	gated, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	type opened struct {
		s   *state.KV
		err error
	}
	done := make(chan opened, 1)
	// Bounded for the test only: a start waits as long as it takes.
	nctx, ncancel := context.WithTimeout(ctx, 30*time.Second)
	defer ncancel()
	go func() {
		s, err := state.NewKV(nctx, gated, state.KVConfig{Bucket: bucket})
		done <- opened{s, err}
	}()
	// The first pull's messages delivered, the marker pending: remove it.
	testenv.Eventually(t, time.Minute, func() bool {
		for ci := range stream.ListConsumers(ctx).Info() {
			if ci.Delivered.Consumer == first && ci.NumPending == 1 {
				return true
			}
		}
		return false
	}, "the first read's consumer to deliver the first pull")
	if err := stream.DeleteMsg(ctx, marker); err != nil {
		t.Fatal(err)
	}
	gate.release()
	got := <-done
	if got.err != nil {
		t.Fatalf("start: %v", got.err)
	}
	t.Cleanup(func() { _ = got.s.Close(context.Background()) })
	sameFullRead(t, got.s, writer)
}

// TestKVFullReadCluster: a cluster member reading every record (its
// first start) while another member writes holds what the writer's store
// does, on the stream's leader and on a member that does not lead it;
// its first read's consumer is on its own server, or was made there
// kvLoadPlaceTries (6) times.
func TestKVFullReadCluster(t *testing.T) {
	const ops = 20_000
	c, _ := testenv.StartJSCluster(t, clusterSize)
	_, js0 := c.Connect(0)
	for _, leader := range []bool{true, false} {
		bucket := nextBucket()
		writer, _ := openLogged(t, js0, state.KVConfig{Bucket: bucket, Replicas: clusterSize})
		fillCacheTest(t, writer)
		fillBucket(t, js0, bucket, ops)
		waitLeader(t, c, 0, bucket, "")
		member := -1
		for i, srv := range c.Srvs {
			if i != 0 && srv.JetStreamIsStreamLeader(server.DEFAULT_GLOBAL_ACCOUNT, "KV_"+bucket) == leader {
				member = i
			}
		}
		if member < 0 {
			t.Logf("member 0, the writer's, leads the stream of %s", bucket)
			continue
		}
		stop, done := make(chan struct{}), make(chan struct{})
		go func() {
			defer close(done)
			writeWhile(t, writer, ops, stop)
		}()
		_, js := c.Connect(member)
		s, logs := openLogged(t, js, state.KVConfig{Bucket: bucket, Replicas: clusterSize})
		close(stop)
		<-done
		sameFullRead(t, s, writer)
		line := ""
		for l := range strings.Lines(logs.String()) {
			if strings.Contains(l, "first read's consumer made") {
				line = l
			}
		}
		t.Logf("member %s (leads the stream: %v): %s", c.Srvs[member].Name(), leader, line)
		if !strings.Contains(line, "server="+c.Srvs[member].Name()+" ") && !strings.Contains(line, "tries=6") {
			t.Errorf("member %d (leader %v): the first read's consumer is elsewhere after fewer than 6 tries: %q; log:\n%s",
				member, leader, line, logs)
		}
		_ = s.Close(context.Background())
	}
}
