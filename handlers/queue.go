package handlers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/state"
)

// job is the queued message of an accepted operation.
type job struct {
	OperationID string `json:"operation_id"`
}

// enqueue publishes the job of an operation; the operation id is the
// message id, so JetStream drops a duplicate within its window.
func (s *Service) enqueue(ctx context.Context, opID string) error {
	data, _ := json.Marshal(job{OperationID: opID})
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	_, err := s.cfg.JetStream.Publish(ctx, bus.JobsSubjectPrefix+opID, data, jetstream.WithMsgID(opID))
	return err
}

// requeueUnfinished queues again every operation the store has as pending
// or executing, so that none is lost even if its job message was.
func (s *Service) requeueUnfinished(ctx context.Context) error {
	for _, st := range []commands.OpStatus{commands.StatusPending, commands.StatusExecuting} {
		ops, _, err := s.cfg.Store.ListOperations(ctx, state.Filter{Status: st})
		if err != nil {
			return fmt.Errorf("handlers: list %s operations: %w", st, err)
		}
		// Oldest first, so the queue keeps the order of acceptance.
		for i := len(ops) - 1; i >= 0; i-- {
			if err := s.requeue(ctx, ops[i]); err != nil {
				return fmt.Errorf("handlers: requeue %s: %w", ops[i].ID, err)
			}
		}
		if len(ops) > 0 {
			s.log.Info("requeued unfinished operations", "status", st, "count", len(ops))
		}
	}
	return nil
}

// requeue queues an unfinished operation again and marks its volume as
// one whose later operations must first look for older ones.
func (s *Service) requeue(ctx context.Context, op commands.Operation) error {
	if op.VolumeID != "" {
		s.mu.Lock()
		s.recovering[op.VolumeID] = true
		s.mu.Unlock()
	}
	return s.enqueue(ctx, op.ID)
}

func (s *Service) startConsumer(ctx context.Context) error {
	cons, err := s.cfg.JetStream.CreateOrUpdateConsumer(ctx, bus.StreamJobs, jetstream.ConsumerConfig{
		Durable:       ConsumerName,
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       s.cfg.AckWait,
		MaxDeliver:    -1,
		MaxAckPending: 10000,
		Description:   "volumed command handlers",
	})
	if err != nil {
		return fmt.Errorf("handlers: consumer: %w", err)
	}
	s.consume, err = cons.Consume(s.dispatch, jetstream.ConsumeErrHandler(func(_ jetstream.ConsumeContext, err error) {
		if !errors.Is(err, jetstream.ErrNoHeartbeat) {
			s.log.Debug("consume", "error", err)
		}
	}))
	if err != nil {
		return fmt.Errorf("handlers: consume: %w", err)
	}
	return nil
}

// dispatch takes a job message in delivery order, puts it in its volume's
// line and runs it when its turn comes. It keeps the message alive with
// heartbeats and acks it only when the operation is terminal.
func (s *Service) dispatch(msg jetstream.Msg) {
	var j job
	if err := json.Unmarshal(msg.Data(), &j); err != nil || j.OperationID == "" {
		s.log.Error("dropping malformed job", "subject", msg.Subject(), "error", err)
		_ = msg.Term()
		return
	}
	log := s.log.With("operation_id", j.OperationID)
	op, err := s.cfg.Store.GetOperation(s.ctx, j.OperationID)
	switch {
	case errors.Is(err, state.ErrNotFound):
		log.Error("dropping job of an unrecorded operation")
		_ = msg.Term()
		return
	case err != nil:
		log.Warn("store unavailable, job will be redelivered", "error", err)
		_ = msg.NakWithDelay(retryDelay)
		return
	case op.Status.Terminal():
		_ = msg.Ack()
		return
	}
	var seq uint64
	if meta, err := msg.Metadata(); err == nil {
		seq = meta.Sequence.Stream
	}
	s.mu.Lock()
	if s.stopping {
		s.mu.Unlock()
		_ = msg.Nak()
		return
	}
	if held, running := s.inflight[op.ID]; running {
		s.mu.Unlock()
		if held != seq {
			_ = msg.Ack() // a second copy of a job already running here
		}
		// Else a redelivery of the very message being worked on: its
		// holder acks it when the operation ends.
		return
	}
	s.inflight[op.ID] = seq
	s.wg.Add(1)
	s.mu.Unlock()

	key := op.VolumeID
	if key == "" {
		key = op.ID
	}
	wait, done := s.keys.enqueue(key)
	go func() {
		defer s.wg.Done()
		defer done()
		defer func() {
			s.mu.Lock()
			delete(s.inflight, op.ID)
			s.mu.Unlock()
		}()
		stopBeat := s.heartbeat(msg)
		defer stopBeat()
		select {
		case <-wait:
		case <-s.ctx.Done():
			_ = msg.Nak()
			return
		}
		select {
		case s.sem <- struct{}{}:
		case <-s.ctx.Done():
			_ = msg.Nak()
			return
		}
		defer func() { <-s.sem }()
		if older := s.olderUnfinished(op); older != "" {
			// After a restart an older operation on this volume may not be
			// redelivered yet: let it go first.
			log.Debug("waiting for an older operation on the volume", "older", older)
			_ = msg.NakWithDelay(retryDelay)
			return
		}
		switch {
		case s.run(j.OperationID, log):
			_ = msg.Ack()
		case s.ctx.Err() != nil:
			_ = msg.Nak() // shutting down: to whoever runs next, at once
		default:
			_ = msg.NakWithDelay(retryDelay) // the store failed
		}
	}()
}

// retryDelay is how long a job put back on the queue waits.
const retryDelay = time.Second

// olderUnfinished returns an operation on op's volume, accepted before op,
// not ended and not running here; "" when there is none (or the store
// cannot tell, in which case run fails on the store anyway). Only volumes
// with a requeued operation are looked up: elsewhere the queue's order is
// the order of acceptance.
func (s *Service) olderUnfinished(op commands.Operation) string {
	s.mu.Lock()
	recovering := s.recovering[op.VolumeID]
	s.mu.Unlock()
	if !recovering {
		return ""
	}
	for _, st := range []commands.OpStatus{commands.StatusPending, commands.StatusExecuting} {
		ops, _, err := s.cfg.Store.ListOperations(s.ctx, state.Filter{VolumeID: op.VolumeID, Status: st})
		if err != nil {
			return ""
		}
		for _, o := range ops {
			s.mu.Lock()
			_, running := s.inflight[o.ID]
			s.mu.Unlock()
			if o.ID != op.ID && !running && o.CreatedAt.Before(op.CreatedAt) {
				return o.ID
			}
		}
	}
	s.mu.Lock()
	delete(s.recovering, op.VolumeID)
	s.mu.Unlock()
	return ""
}

// heartbeat tells JetStream the job is still being worked on.
func (s *Service) heartbeat(msg jetstream.Msg) (stop func()) {
	done := make(chan struct{})
	go func() {
		t := time.NewTicker(s.cfg.AckWait / 3)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				_ = msg.InProgress()
			}
		}
	}()
	return func() { close(done) }
}
