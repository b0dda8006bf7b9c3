package follow_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/internal/follow"
	"github.com/volumed/volumed/internal/testenv"
)

// got records what a Reader handed over.
type got struct {
	mu   sync.Mutex
	seqs []uint64
	data []string
}

func (g *got) handle(msg jetstream.Msg) {
	meta, err := msg.Metadata()
	if err != nil {
		panic(err)
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	g.seqs = append(g.seqs, meta.Sequence.Stream)
	g.data = append(g.data, msg.Subject()+" "+string(msg.Data()))
}

func (g *got) len() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.data)
}

// check fails the test unless the messages handed over are want, in
// stream order.
func (g *got) check(t *testing.T, want []string) {
	t.Helper()
	g.mu.Lock()
	defer g.mu.Unlock()
	if !slices.Equal(g.data, want) {
		t.Fatalf("handed over %q, want %q", g.data, want)
	}
	if !slices.IsSorted(g.seqs) || len(slices.Compact(slices.Clone(g.seqs))) != len(g.seqs) {
		t.Fatalf("stream sequences %v, want increasing", g.seqs)
	}
}

// publish stores msgs data numbered from..to-1 on subject and returns
// what a reader of it is to hand over.
func publish(ctx context.Context, t *testing.T, js jetstream.JetStream, subject string, from, to int) []string {
	t.Helper()
	var want []string
	for i := from; i < to; i++ {
		if _, err := js.Publish(ctx, subject, []byte(strconv.Itoa(i))); err != nil {
			t.Fatalf("publish %d: %v", i, err)
		}
		want = append(want, fmt.Sprintf("%s %d", subject, i))
	}
	return want
}

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// TestReaderFilterStartClose: on one server, a reader begins at its start
// sequence, hands over only its subjects, in order; when its consumer is
// removed under it, it goes on from the next message on a consumer of
// another name, none lost, none twice; Close stops it and removes its
// consumer.
func TestReaderFilterStartClose(t *testing.T) {
	b := testenv.StartBus(t)
	js := b.JetStream()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "FOLLOW", Subjects: []string{"follow.>"}}); err != nil {
		t.Fatal(err)
	}
	publish(ctx, t, js, "follow.a", 0, 2) // sequences 1 and 2, before the start
	want := publish(ctx, t, js, "follow.a", 2, 4)
	publish(ctx, t, js, "follow.b", 0, 2) // not followed
	var g got
	r, err := follow.Start(ctx, js, follow.Config{Stream: "FOLLOW", FilterSubjects: []string{"follow.a", "follow.c"},
		DeliverPolicy: jetstream.DeliverByStartSequencePolicy, OptStartSeq: 3, Logger: quiet}, g.handle)
	if err != nil {
		t.Fatal(err)
	}
	want = append(want, publish(ctx, t, js, "follow.c", 0, 2)...)
	testenv.Eventually(t, 10*time.Second, func() bool { return g.len() >= len(want) }, "%d messages", len(want))
	g.check(t, want)

	first := testenv.Consumers(ctx, t, js, "FOLLOW")
	if len(first) != 1 {
		t.Fatalf("consumers %v, want the reader's alone", first)
	}
	for name := range first {
		if err := js.DeleteConsumer(ctx, "FOLLOW", name); err != nil {
			t.Fatal(err)
		}
	}
	want = append(want, publish(ctx, t, js, "follow.a", 4, 8)...)
	testenv.Eventually(t, 10*time.Second, func() bool { return g.len() >= len(want) }, "%d messages", len(want))
	g.check(t, want)
	second := testenv.Consumers(ctx, t, js, "FOLLOW")
	for name := range second {
		if _, ok := first[name]; ok || len(second) != 1 {
			t.Fatalf("consumers %v after %v was removed, want one of another name", second, first)
		}
	}

	if err := r.Close(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case <-r.Done():
	default:
		t.Fatal("Done open after Close")
	}
	if left := testenv.Consumers(ctx, t, js, "FOLLOW"); len(left) != 0 {
		t.Fatalf("consumers %v left after Close", left)
	}
	publish(ctx, t, js, "follow.a", 8, 9)
	time.Sleep(200 * time.Millisecond)
	g.check(t, want)
	if err := r.Close(ctx); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

// TestReaderOutlivesItsServer: on a three-server cluster, the server
// holding a reader's consumer (not the meta leader, the stream's leader
// or the reader's own server) is shut down; what is published afterwards
// is handed over within a few seconds, after what came before, in order,
// none lost, none twice.
func TestReaderOutlivesItsServer(t *testing.T) {
	const n = 3
	// The stream is made through the meta leader, which leads it too.
	c, js := testenv.StartJSCluster(t, n)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	const stream = "FOLLOW"
	// Until every peer has reported in, placing three replicas fails.
	testenv.Eventually(t, 30*time.Second, func() bool {
		_, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: stream, Subjects: []string{"follow.>"}, Replicas: n})
		return err == nil
	}, "a stream of %d replicas made", n)
	want := publish(ctx, t, js, "follow.a", 0, 5)
	// Start readers until one's consumer is on another member than the
	// leaders (each try places it on one of the three at random).
	var g *got
	var r *follow.Reader
	victim := -1
	for try := 0; victim < 0; try++ {
		if try == 30 {
			t.Fatal("the consumer was never placed off the leaders")
		}
		g = &got{}
		var err error
		r, err = follow.Start(ctx, js, follow.Config{Stream: stream, FilterSubjects: []string{"follow.a"}, Logger: quiet}, g.handle)
		if err != nil {
			t.Fatal(err)
		}
		hosts := testenv.Consumers(ctx, t, js, stream)
		if len(hosts) != 1 {
			t.Fatalf("consumers %v, want the reader's alone", hosts)
		}
		for _, host := range hosts {
			victim = c.Bystander(host, stream)
		}
		if victim < 0 {
			if err := r.Close(ctx); err != nil {
				t.Fatal(err)
			}
		}
	}
	defer r.Close(context.Background())
	testenv.Eventually(t, 10*time.Second, func() bool { return g.len() >= len(want) }, "%d messages", len(want))

	c.Srvs[victim].Shutdown()
	c.Srvs[victim].WaitForShutdown()
	killed := time.Now()
	want = append(want, publish(ctx, t, js, "follow.a", 5, 25)...)
	publish(ctx, t, js, "follow.b", 0, 3)
	const within = 8 * time.Second
	testenv.Eventually(t, within, func() bool { return g.len() >= len(want) },
		"%d messages within %v of the consumer's server going", len(want), within)
	t.Logf("all handed over %v after the consumer's server went", time.Since(killed).Round(time.Millisecond))
	time.Sleep(200 * time.Millisecond) // none more after
	g.check(t, want)
}

// TestReaderStartWaitsForQuorum: a reader started while its stream has no
// quorum (two of three members down, as when they restart) keeps asking
// for its consumer, and starts, handing everything over, once they are
// back; before formation.Wait it failed after 5 s.
func TestReaderStartWaitsForQuorum(t *testing.T) {
	const n = 3
	c, js := testenv.StartJSCluster(t, n)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	const stream = "FOLLOW"
	testenv.Eventually(t, 30*time.Second, func() bool {
		_, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: stream, Subjects: []string{"follow.>"}, Replicas: n})
		return err == nil
	}, "a stream of %d replicas made", n)
	want := publish(ctx, t, js, "follow.a", 0, 5)
	_, js0 := c.Connect(0)
	for i := 1; i < n; i++ {
		c.Srvs[i].Shutdown()
		c.Srvs[i].WaitForShutdown()
	}
	var out testenv.Buffer
	log := slog.New(slog.NewTextHandler(&out, &slog.HandlerOptions{Level: slog.LevelDebug}))
	g := &got{}
	started := make(chan error, 1)
	var r *follow.Reader
	go func() {
		var err error
		// No deadline, as at volumed's start: the client's default 5 s
		// bounded the one request it made before formation.Wait.
		r, err = follow.Start(context.Background(), js0, follow.Config{Stream: stream, FilterSubjects: []string{"follow.a"}, Logger: log}, g.handle)
		started <- err
	}()
	testenv.Eventually(t, 30*time.Second, func() bool {
		return len(testenv.Mentioning(out.Lines(), "jetstream not ready yet")) > 0
	}, "a consumer request retried while the stream has no quorum")
	for i := 1; i < n; i++ {
		c.Start(i)
	}
	select {
	case err := <-started:
		if err != nil {
			t.Fatalf("start once the members are back: %v", err)
		}
	case <-ctx.Done():
		t.Fatal("the reader never started")
	}
	defer r.Close(context.Background())
	testenv.Eventually(t, 10*time.Second, func() bool { return g.len() >= len(want) }, "%d messages", len(want))
	g.check(t, want)
}
