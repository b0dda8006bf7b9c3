// Package follow reads one JetStream stream in stream order through pull
// consumers that outlive the cluster member holding them.
//
// A consumer lives on one member of a cluster, chosen by the server. When
// that member goes (kill -9 of an embedded instance), the library's ordered
// consumer asks for its lost consumer again by name, which hangs for as
// long as that member is gone, and a push consumer notices only after 10
// to 20 s. A Reader pulls with 1 s idle heartbeats instead: after two
// missed ones, a gap in its deliveries, or a consumer creation left
// unanswered for 3 s, it goes on from the message after the last one it
// handled, on a new consumer with a new name.
package follow

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/internal/backoff"
	"github.com/volumed/volumed/internal/formation"
)

// How a Reader pulls.
const (
	pullExpiry = 5 * time.Second
	heartbeat  = time.Second
	// createTry bounds making a consumer after the first: one placed on a
	// member that has just gone (the cluster does not know yet) never
	// answers.
	createTry = 3 * time.Second
	// inactive: the server removes a consumer left behind this long.
	inactive = time.Minute
	// The pause before making a consumer again grows from minPause to
	// maxPause while makes fail.
	minPause = 100 * time.Millisecond
	maxPause = 2 * time.Second
)

// Config says what a Reader follows and where it begins.
type Config struct {
	// Stream is the name of the stream followed; required.
	Stream string
	// FilterSubjects narrow the stream to these subjects; none: all.
	FilterSubjects []string
	// DeliverPolicy, OptStartSeq and OptStartTime say where the first
	// consumer begins, as in jetstream.ConsumerConfig; every later one
	// begins right after the last message handled, or where the first
	// began if none was.
	DeliverPolicy jetstream.DeliverPolicy
	OptStartSeq   uint64
	OptStartTime  *time.Time
	// OnConsumer, if set, is called with the info of each consumer made,
	// before it delivers anything: from Start for the first, then from
	// the goroutine that calls the handler.
	OnConsumer func(*jetstream.ConsumerInfo)
	// Logger receives the Reader's logs; default slog.Default().
	Logger *slog.Logger
}

// Reader hands every message of a stream to its handler, one at a time in
// stream order, none twice, until Close or the connection's close.
type Reader struct {
	js     jetstream.JetStream
	cfg    Config
	handle func(jetstream.Msg)
	log    *slog.Logger

	stop chan struct{} // closed by Close
	done chan struct{} // closed when follow returns

	mu      sync.Mutex // guards iter, cons and stopped
	iter    jetstream.MessagesContext
	cons    jetstream.Consumer
	stopped bool
}

// errStopped ends read when the Reader is closed.
var errStopped = errors.New("follow: reader closed")

// Start makes the first consumer within ctx and hands what it delivers,
// then what its successors deliver, to handle in the background.
func Start(ctx context.Context, js jetstream.JetStream, cfg Config, handle func(jetstream.Msg)) (*Reader, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	r := &Reader{js: js, cfg: cfg, handle: handle, log: cfg.Logger.With("stream", cfg.Stream),
		stop: make(chan struct{}), done: make(chan struct{})}
	// A member restarting into a cluster whose replicas catch up waits
	// for them, as the streams' set-up does.
	var cons jetstream.Consumer
	err := formation.Wait(ctx, r.log, "consumer of "+cfg.Stream, func(ctx context.Context) error {
		var err error
		cons, err = r.consumer(ctx, 0)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("follow %s: %w", cfg.Stream, err)
	}
	go r.follow(cons)
	return r, nil
}

// Done is closed once the Reader has stopped: after Close, or when the
// connection closed.
func (r *Reader) Done() <-chan struct{} { return r.done }

// consumer makes a consumer of the stream: as Config says when from is 0,
// else from sequence from on.
func (r *Reader) consumer(ctx context.Context, from uint64) (jetstream.Consumer, error) {
	cfg := jetstream.ConsumerConfig{DeliverPolicy: r.cfg.DeliverPolicy, OptStartSeq: r.cfg.OptStartSeq,
		OptStartTime: r.cfg.OptStartTime, AckPolicy: jetstream.AckNonePolicy, Replicas: 1, MemoryStorage: true,
		InactiveThreshold: inactive}
	if len(r.cfg.FilterSubjects) == 1 {
		cfg.FilterSubject = r.cfg.FilterSubjects[0]
	} else {
		cfg.FilterSubjects = r.cfg.FilterSubjects
	}
	if from > 0 {
		cfg.DeliverPolicy, cfg.OptStartSeq, cfg.OptStartTime = jetstream.DeliverByStartSequencePolicy, from, nil
	}
	cons, err := r.js.CreateConsumer(ctx, r.cfg.Stream, cfg)
	if err != nil {
		return nil, err
	}
	if r.cfg.OnConsumer != nil {
		r.cfg.OnConsumer(cons.CachedInfo())
	}
	return cons, nil
}

// follow reads cons until it fails, then a new consumer from the next
// sequence, until Close or the connection closes.
func (r *Reader) follow(cons jetstream.Consumer) {
	defer close(r.done)
	var next uint64 // the sequence after the last one handled; 0 before the first
	pause := backoff.Policy{Min: minPause, Max: maxPause}.Start()
	for {
		if cons == nil {
			select {
			case <-r.stop:
				return
			case <-time.After(pause.Next()):
			}
			ctx, cancel := context.WithTimeout(context.Background(), createTry)
			var err error
			cons, err = r.consumer(ctx, next)
			cancel()
			if errors.Is(err, nats.ErrConnectionClosed) {
				return
			}
			if err != nil {
				r.log.Debug("follower consumer not made", "from", next, "err", err)
				continue
			}
			pause.Reset()
		}
		read, err := r.read(cons, &next)
		if errors.Is(err, nats.ErrConnectionClosed) || errors.Is(err, errStopped) {
			return
		}
		r.log.Debug("follower goes on from a new consumer", "from", next, "read", read, "err", err)
		cons = nil
	}
}

// read hands what cons delivers to the handler until it fails: missing
// heartbeats, a gap in its delivery sequence, or its end. next is the
// stream sequence after the last message handled.
func (r *Reader) read(cons jetstream.Consumer, next *uint64) (int, error) {
	r.mu.Lock()
	r.cons = cons
	if r.stopped {
		r.mu.Unlock()
		return 0, errStopped
	}
	r.mu.Unlock()
	iter, err := cons.Messages(jetstream.PullExpiry(pullExpiry), jetstream.PullHeartbeat(heartbeat))
	if err != nil {
		return 0, err
	}
	r.mu.Lock()
	if r.stopped {
		r.mu.Unlock()
		iter.Stop()
		return 0, errStopped
	}
	r.iter = iter
	r.mu.Unlock()
	defer iter.Stop()
	var delivered uint64
	for n := 0; ; n++ {
		msg, err := iter.Next()
		if err != nil {
			select {
			case <-r.stop:
				return n, errStopped
			default:
			}
			return n, err
		}
		meta, err := msg.Metadata()
		if err != nil {
			return n, err
		}
		if meta.Sequence.Consumer != delivered+1 {
			return n, errors.New("follow: a delivery was missed")
		}
		delivered = meta.Sequence.Consumer
		r.handle(msg)
		*next = meta.Sequence.Stream + 1
	}
}

// Close stops the Reader, waits for it within ctx (the handler's call
// under way ends first) and removes its last consumer. Closing twice is
// safe.
func (r *Reader) Close(ctx context.Context) error {
	r.mu.Lock()
	if !r.stopped {
		r.stopped = true
		close(r.stop)
	}
	iter := r.iter
	r.mu.Unlock()
	if iter != nil {
		iter.Stop()
	}
	select {
	case <-r.done:
	case <-ctx.Done():
		return fmt.Errorf("follow %s: close: %w", r.cfg.Stream, ctx.Err())
	}
	r.mu.Lock()
	cons := r.cons
	r.cons = nil
	r.mu.Unlock()
	if cons != nil {
		dctx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		_ = r.js.DeleteConsumer(dctx, r.cfg.Stream, cons.CachedInfo().Name)
	}
	return nil
}
