package metrics_test

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/metrics"
	"github.com/volumed/volumed/nbd"
)

// counters is a Counters whose answer the test sets.
type counters struct {
	events int64
	err    error
}

func (c *counters) Metrics(context.Context) (commands.Metrics, error) {
	return commands.Metrics{Details: commands.MetricsDetails{DeviceEventsProcessed: c.events}}, c.err
}

// nbdStats is an NBDStats with fixed counters.
type nbdStats nbd.Stats

func (s nbdStats) Stats() nbd.Stats { return nbd.Stats(s) }

// TestExporter counts operation events from a real embedded bus and reads
// the scrape-time sources, a failing one included.
func TestExporter(t *testing.T) {
	b := testenv.StartBus(t)
	if _, err := metrics.New(metrics.Config{}); err == nil {
		t.Fatal("New without a bus accepted")
	}
	cs := &counters{events: 7}
	e, err := metrics.New(metrics.Config{Conn: b.Conn(), JetStream: b.JetStream(), Counters: cs,
		NBD: nbdStats{Connections: 1, ConnectionsTotal: 3, BytesRead: 4096, BytesWritten: 512}})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	created := time.Now().UTC()
	done := created.Add(1500 * time.Millisecond)
	for _, op := range []commands.Operation{
		{ID: "op-1", Type: commands.OpAttach, Status: commands.StatusPending, CreatedAt: created},
		{ID: "op-1", Type: commands.OpAttach, Status: commands.StatusExecuting, Step: "attach:job", CreatedAt: created},
		{ID: "op-1", Type: commands.OpAttach, Status: commands.StatusFailed, CreatedAt: created, CompletedAt: &done},
		// The reconcile's record of its timed-out job: not counted again.
		{ID: "op-1", Type: commands.OpAttach, Status: commands.StatusFailed, CreatedAt: created, CompletedAt: &done,
			Details: map[string]any{commands.DetailJobMayRun: false, commands.DetailResolvedAt: done.Format(time.RFC3339)}},
		// Published after it, so counted after it.
		{ID: "op-3", Type: commands.OpCreate, Status: commands.StatusCompleted, CreatedAt: created, CompletedAt: &done},
	} {
		data, _ := json.Marshal(op)
		if err := b.Conn().Publish(commands.OpSubject(op.ID), data); err != nil {
			t.Fatal(err)
		}
	}
	_ = b.Conn().Publish(commands.OpSubject("op-2"), []byte("not json")) // ignored
	reg := e.Registry()
	testenv.Eventually(t, 30*time.Second, func() bool {
		n, _ := testutil.GatherAndCount(reg, "volumed_operation_duration_seconds")
		return n == 2
	}, "the failed attach's and the completed create's durations observed")
	want := `
# HELP volumed_nbd_bytes_total Payload bytes moved through the NBD exports since this process started, by direction (read, write).
# TYPE volumed_nbd_bytes_total counter
volumed_nbd_bytes_total{direction="read"} 4096
volumed_nbd_bytes_total{direction="write"} 512
# HELP volumed_device_events_total Device events (add, remove, change) the correlator received since this process started.
# TYPE volumed_device_events_total counter
volumed_device_events_total 7
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "volumed_nbd_bytes_total", "volumed_device_events_total"); err != nil {
		t.Fatal(err)
	}
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, f := range fams {
		for _, m := range f.Metric {
			key := f.GetName()
			for _, l := range m.Label {
				key += "," + l.GetName() + "=" + l.GetValue()
			}
			switch {
			case m.Counter != nil:
				got[key] = m.Counter.GetValue()
			case m.Gauge != nil:
				got[key] = m.Gauge.GetValue()
			case m.Histogram != nil:
				got[key] = m.Histogram.GetSampleSum()
			}
		}
	}
	for key, v := range map[string]float64{
		"volumed_operations_total,status=pending,type=attach":   1,
		"volumed_operations_total,status=failed,type=attach":    1,
		"volumed_operations_total,status=completed,type=attach": 0,
		"volumed_operation_duration_seconds,type=attach":        1.5,
		"volumed_operations_total,status=completed,type=create": 1,
		"volumed_nbd_connections":                               1,
		"volumed_nbd_connections_total":                         3,
		"volumed_queue_depth":                                   0,
		"volumed_scrape_errors,source=queue":                    0,
		"volumed_scrape_errors,source=counters":                 0,
	} {
		if got[key] != v {
			t.Errorf("%s = %v, want %v", key, got[key], v)
		}
	}
	if _, ok := got["volumed_operations_total,status=executing,type=attach"]; ok {
		t.Error("executing events counted")
	}
	cs.err = errors.New("store down")
	if err := testutil.GatherAndCompare(reg, strings.NewReader(`
# HELP volumed_scrape_errors Sources this scrape could not read, by source (queue, counters).
# TYPE volumed_scrape_errors gauge
volumed_scrape_errors{source="counters"} 1
volumed_scrape_errors{source="queue"} 0
`), "volumed_scrape_errors"); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if err := e.Close(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
}

// TestQueueGauges reads a real JetStream consumer of the job stream: a job
// queued, then delivered and not acknowledged, then redelivered after its
// ack wait, then acknowledged.
func TestQueueGauges(t *testing.T) {
	b := testenv.StartBus(t)
	e, err := metrics.New(metrics.Config{Conn: b.Conn(), JetStream: b.JetStream(), Counters: &counters{}})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	cons, err := b.JetStream().CreateOrUpdateConsumer(ctx, bus.StreamJobs, jetstream.ConsumerConfig{
		Durable: "gauges", AckPolicy: jetstream.AckExplicitPolicy, AckWait: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.JetStream().Publish(ctx, bus.JobsSubjectPrefix+"op-1", []byte("{}")); err != nil {
		t.Fatal(err)
	}
	gauges := func() [3]float64 {
		t.Helper()
		fams, err := e.Registry().Gather()
		if err != nil {
			t.Fatal(err)
		}
		var g [3]float64
		for _, f := range fams {
			for i, name := range []string{"volumed_queue_depth", "volumed_queue_in_flight", "volumed_queue_redelivered"} {
				if f.GetName() == name {
					g[i] = f.Metric[0].GetGauge().GetValue()
				}
			}
		}
		return g
	}
	fetch := func() jetstream.Msg {
		t.Helper()
		batch, err := cons.Fetch(1, jetstream.FetchMaxWait(5*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		for msg := range batch.Messages() {
			return msg
		}
		t.Fatalf("no message fetched: %v", batch.Error())
		return nil
	}
	if g := gauges(); g != [3]float64{1, 0, 0} {
		t.Fatalf("queued: depth, in flight, redelivered = %v, want [1 0 0]", g)
	}
	fetch() // not acknowledged
	if g := gauges(); g != [3]float64{0, 1, 0} {
		t.Fatalf("delivered: %v, want [0 1 0]", g)
	}
	msg := fetch() // after the ack wait: redelivered
	if meta, err := msg.Metadata(); err != nil || meta.NumDelivered != 2 {
		t.Fatalf("second delivery: %+v %v", meta, err)
	}
	if g := gauges(); g != [3]float64{0, 1, 1} {
		t.Fatalf("redelivered: %v, want [0 1 1]", g)
	}
	if err := msg.DoubleAck(ctx); err != nil {
		t.Fatal(err)
	}
	if g := gauges(); g != [3]float64{0, 0, 0} {
		t.Fatalf("acknowledged: %v, want [0 0 0]", g)
	}
}

// TestConsumerCopiesNotCounted: an operation event a JetStream consumer
// delivers onto volumes.ops.> (its reply an ack subject) is not counted;
// the same event published is.
func TestConsumerCopiesNotCounted(t *testing.T) {
	b := testenv.StartBus(t)
	e, err := metrics.New(metrics.Config{Conn: b.Conn(), JetStream: b.JetStream(), Counters: &counters{}})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.Close(context.Background()) })
	// A real consumer's copy: a stream outside volumes.ops.> holds the
	// event, and a push consumer delivers it onto volumes.ops.op-3.
	js, err := b.Conn().JetStream()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := js.AddStream(&nats.StreamConfig{Name: "REPLAY", Subjects: []string{"replay.>"}}); err != nil {
		t.Fatal(err)
	}
	done := time.Now().UTC()
	copied, _ := json.Marshal(commands.Operation{ID: "op-3", Type: commands.OpDelete, Status: commands.StatusCompleted,
		CreatedAt: done.Add(-time.Second), CompletedAt: &done})
	if _, err := js.Publish("replay.op-3", copied); err != nil {
		t.Fatal(err)
	}
	// The server binds a push consumer to a subscription on its exact
	// deliver subject (not to volumes.ops.>); this one also sees the copy.
	probe, err := b.Conn().SubscribeSync(commands.OpSubject("op-3"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := js.AddConsumer("REPLAY", &nats.ConsumerConfig{Durable: "replay", DeliverSubject: commands.OpSubject("op-3"),
		AckPolicy: nats.AckExplicitPolicy}); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 30*time.Second, func() bool {
		ci, err := js.ConsumerInfo("REPLAY", "replay")
		return err == nil && ci.Delivered.Consumer >= 1
	}, "the consumer delivered its copy onto %s", commands.OpSubject("op-3"))
	if m, err := probe.NextMsg(5 * time.Second); err != nil || !bus.FromConsumer(m) {
		t.Fatalf("the consumer's copy: %v, %v", m, err)
	}
	// Published after the copy was delivered, so counted after it.
	published, _ := json.Marshal(commands.Operation{ID: "op-4", Type: commands.OpDetach, Status: commands.StatusPending,
		CreatedAt: done})
	if err := b.Conn().Publish(commands.OpSubject("op-4"), published); err != nil {
		t.Fatal(err)
	}
	count := func(typ commands.OpType, status commands.OpStatus) float64 {
		fams, err := e.Registry().Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range fams {
			for _, m := range f.Metric {
				labels := map[string]string{}
				for _, l := range m.Label {
					labels[l.GetName()] = l.GetValue()
				}
				if f.GetName() == "volumed_operations_total" && labels["type"] == string(typ) && labels["status"] == string(status) {
					return m.Counter.GetValue()
				}
			}
		}
		return 0
	}
	testenv.Eventually(t, 30*time.Second, func() bool { return count(commands.OpDetach, commands.StatusPending) == 1 },
		"the published event counted")
	if n := count(commands.OpDelete, commands.StatusCompleted); n != 0 {
		t.Fatalf("a consumer's copy was counted: completed deletes = %v, want 0", n)
	}
}
