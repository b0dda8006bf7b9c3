package handlers_test

import (
	"context"
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/state"
	"github.com/volumed/volumed/test/cloudsim"
)

// countingJS counts the accept path's JetStream publishes (a job, or a
// first event): those whose ack is waited for, and the others.
type countingJS struct {
	jetstream.JetStream
	waited, async atomic.Int64
}

// accepts reports whether a publish is the accept path's.
func accepts(subject string, data []byte) bool {
	var op commands.Operation
	return !strings.HasPrefix(subject, commands.SubjectOpsPrefix) || (json.Unmarshal(data, &op) == nil && op.Status == commands.StatusPending)
}

func (c *countingJS) Publish(ctx context.Context, subject string, data []byte, opts ...jetstream.PublishOpt) (*jetstream.PubAck, error) {
	if accepts(subject, data) {
		c.waited.Add(1)
	}
	return c.JetStream.Publish(ctx, subject, data, opts...)
}

func (c *countingJS) PublishAsync(subject string, data []byte, opts ...jetstream.PublishOpt) (jetstream.PubAckFuture, error) {
	if accepts(subject, data) {
		c.async.Add(1)
	}
	return c.JetStream.PublishAsync(subject, data, opts...)
}

// countingStore counts the operation writes of the service.
type countingStore struct {
	state.Store
	writes atomic.Int64
}

func (c *countingStore) CreateOperation(ctx context.Context, op commands.Operation) (commands.Operation, error) {
	c.writes.Add(1)
	return c.Store.CreateOperation(ctx, op)
}

// BenchmarkAccept measures creates over NATS request/reply to the command
// service, 16 at a time, with each store; the simulator holds the
// executor's createVolume calls, so that the figure is the accept path's. It reports the durable writes
// of the accept path per command: records created (records/op), and the
// JetStream publishes of the job and the first event, those whose ack it
// waits for (waited-publishes/op) and the others (async-publishes/op).
func BenchmarkAccept(b *testing.B) {
	for _, redis := range []bool{false, true} {
		name := "embedded"
		if redis {
			name = "redis"
		}
		b.Run(name, func(b *testing.B) {
			store, js := &countingStore{}, &countingJS{}
			h := newHarness(b, harnessOpts{redis: redis, wrap: func(s state.Store) state.Store { store.Store = s; return store },
				wrapJS: func(j jetstream.JetStream) jetstream.JetStream { js.JetStream = j; return js }})
			// The executor holds the creates in createVolume, so the
			// figure is the accept path's.
			h.setFaults(cloudsim.Faults{Latency: map[string]cloudsim.Duration{"createVolume": cloudsim.Duration(time.Hour)}})
			body, _ := json.Marshal(createBody("bench"))
			b.SetParallelism(8) // 16 requesters on 2 cores
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					reply, err := h.nc.Request(commands.SubjectCreate, body, 10*time.Second)
					if err != nil {
						b.Error(err)
						return
					}
					if st, _ := strconv.Atoi(reply.Header.Get(commands.StatusHeader)); st != http.StatusCreated {
						b.Errorf("status %d: %s", st, reply.Data)
						return
					}
				}
			})
			b.StopTimer()
			b.ReportMetric(float64(store.writes.Load())/float64(b.N), "records/op")
			b.ReportMetric(float64(js.waited.Load())/float64(b.N), "waited-publishes/op")
			b.ReportMetric(float64(js.async.Load())/float64(b.N), "async-publishes/op")
		})
	}
}
