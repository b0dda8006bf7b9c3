package handlers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/engine"
	"github.com/volumed/volumed/internal/backoff"
	"github.com/volumed/volumed/internal/formation"
	"github.com/volumed/volumed/state"
)

// job is the queued message of an accepted operation.
type job struct {
	OperationID string `json:"operation_id"`
}

// lineOf names the line an operation waits in: its volume, or, for a
// create (whose volume does not exist yet), the operation itself. The line
// never changes during the operation's life, so every copy of its job is
// on the same subject.
func lineOf(op commands.Operation) string {
	if op.Type == commands.OpCreate || op.VolumeID == "" {
		return op.ID
	}
	return op.VolumeID
}

// jobSubject is the subject of an operation's job:
// volumed.jobs.<line>.<operation_id>.
func jobSubject(op commands.Operation) string {
	return bus.JobsSubjectPrefix + lineOf(op) + "." + op.ID
}

// lineOfSubject returns the line of a job subject; a job queued by an
// older volumed (volumed.jobs.<operation_id>) is its own line.
func lineOfSubject(subject string) string {
	rest := strings.TrimPrefix(subject, bus.JobsSubjectPrefix)
	line, _, _ := strings.Cut(rest, ".")
	return line
}

// enqueue publishes the job of an accepted operation on its line. The
// operation id is the message id, so JetStream drops a copy published
// within the dedup window; a later copy waits behind the first in the line
// and finds the operation ended.
func (s *Service) enqueue(ctx context.Context, op commands.Operation) error {
	_, err := s.publishJob(ctx, op, op.ID)
	return err
}

// publishJob publishes op's job under message id msgID and reports whether
// JetStream kept it (false: a duplicate within the dedup window).
func (s *Service) publishJob(ctx context.Context, op commands.Operation, msgID string) (bool, error) {
	data, _ := json.Marshal(job{OperationID: op.ID})
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	ack, err := s.cfg.JetStream.Publish(ctx, jobSubject(op), data, jetstream.WithMsgID(msgID))
	if err != nil {
		return false, err
	}
	return !ack.Duplicate, nil
}

// jobQueued reports whether the operation's job is in the work queue
// (waiting, or delivered and not acked).
func (s *Service) jobQueued(ctx context.Context, op commands.Operation) (bool, error) {
	_, err := s.jobs.GetMsg(ctx, 1, jetstream.WithGetMsgSubject(jobSubject(op)))
	switch {
	case errors.Is(err, jetstream.ErrMsgNotFound):
		return false, nil
	case err != nil:
		return false, err
	}
	return true, nil
}

// sweep queues again, under the sweep lease (one instance at a time; when
// another holds it, it sweeps), every unfinished operation whose job is
// missing from the work queue (an accept whose undo failed, a lost
// stream), oldest first. Operations whose job is queued are left to it:
// whoever holds the job runs them, and JetStream redelivers it after a
// crash, to another instance if need be.
func (s *Service) sweep(ctx context.Context) ([]string, error) {
	var changes []string
	err := s.leases.Leased(ctx, engine.LeaseSweep, false, func(ctx context.Context) error {
		var err error
		changes, err = s.sweepLeased(ctx)
		return err
	})
	if errors.Is(err, state.ErrLeaseHeld) {
		return nil, nil
	}
	return changes, err
}

func (s *Service) sweepLeased(ctx context.Context) ([]string, error) {
	var changes []string
	for _, st := range []commands.OpStatus{commands.StatusPending, commands.StatusExecuting} {
		ops, _, err := s.cfg.Store.ListOperations(ctx, state.Filter{Status: st})
		if err != nil {
			return changes, state.APIError(err)
		}
		for i := len(ops) - 1; i >= 0; i-- {
			op := ops[i]
			queued, err := s.jobQueued(ctx, op)
			if err != nil {
				return changes, commands.Unavailable("command queue unavailable: %v", err)
			}
			if queued {
				continue
			}
			// Not the operation id as message id: the first job may have
			// been lost within the dedup window. The revision keeps two
			// sweeps of the same record from queueing it twice.
			kept, err := s.publishJob(ctx, op, fmt.Sprintf("%s@%d", op.ID, op.Revision))
			if err != nil {
				return changes, commands.Unavailable("command queue unavailable: %v", err)
			}
			if !kept {
				continue
			}
			changes = append(changes, fmt.Sprintf("requeued %s operation %s (%s): its job was missing", op.Type, op.ID, op.Status))
		}
	}
	if len(changes) > 0 {
		s.log.Info("requeued operations without a job", "changes", changes)
	}
	return changes, nil
}

func (s *Service) startConsumer(ctx context.Context) error {
	// A member restarting into a cluster whose replicas catch up waits
	// for them, as the streams' set-up does.
	var cons jetstream.Consumer
	err := formation.Wait(ctx, s.log, "consumer "+ConsumerName, func(ctx context.Context) error {
		var err error
		if s.jobs, err = s.cfg.JetStream.Stream(ctx, bus.StreamJobs); err != nil {
			return fmt.Errorf("stream %s: %w", bus.StreamJobs, err)
		}
		cons, err = s.cfg.JetStream.CreateOrUpdateConsumer(ctx, bus.StreamJobs, jetstream.ConsumerConfig{
			Durable:       ConsumerName,
			AckPolicy:     jetstream.AckExplicitPolicy,
			AckWait:       s.cfg.AckWait,
			MaxDeliver:    -1,
			MaxAckPending: MaxJobsInFlight,
			Description:   "volumed command handlers",
		})
		return err
	})
	if err != nil {
		return fmt.Errorf("handlers: consumer: %w", err)
	}
	// Short pulls: when the consumer's leader moves (a node lost, a slow
	// one), a lost pull is noticed within a few seconds, not 30.
	s.consume, err = cons.Consume(s.dispatch, jetstream.PullExpiry(5*time.Second), jetstream.PullHeartbeat(2*time.Second),
		jetstream.ConsumeErrHandler(func(_ jetstream.ConsumeContext, err error) {
			if !errors.Is(err, jetstream.ErrNoHeartbeat) {
				s.log.Debug("consume", "err", err)
			}
		}))
	if err != nil {
		return fmt.Errorf("handlers: consume: %w", err)
	}
	return nil
}

// Delays of a job put back on the queue.
const (
	// unrecordedGrace: a job whose operation the store does not show is
	// dropped only when it is older than this (accept undone, retention).
	unrecordedGrace = time.Minute
	// retryDelay: the store or the queue failed.
	retryDelay = time.Second
)

// turnBackoff bounds the wait of a job whose turn has not come; it
// doubles with each delivery.
var turnBackoff = backoff.Policy{Min: 20 * time.Millisecond, Max: 500 * time.Millisecond}

// dispatch takes a job message. It runs the operation only when the job is
// the first message left on its line's subject in the work-queue stream,
// so operations on one volume run one at a time in JetStream's order, on
// whichever instance holds the message; otherwise the job goes back to the
// queue for a little while. It heartbeats the message while it works and
// acks it only when the operation is terminal.
func (s *Service) dispatch(msg jetstream.Msg) {
	var j job
	if err := json.Unmarshal(msg.Data(), &j); err != nil || j.OperationID == "" {
		s.log.Error("dropping malformed job", "subject", msg.Subject(), "err", err)
		_ = msg.Term()
		return
	}
	meta, err := msg.Metadata()
	if err != nil {
		s.log.Error("dropping job without metadata", "subject", msg.Subject(), "err", err)
		_ = msg.Term()
		return
	}
	log := s.log.With("operation_id", j.OperationID)
	s.mu.Lock()
	if s.stopping {
		s.mu.Unlock()
		_ = msg.Nak()
		return
	}
	s.wg.Add(1)
	s.mu.Unlock()
	go func() {
		defer s.wg.Done()
		s.take(msg, meta, j.OperationID, log)
	}()
}

// take decides what to do with a job message and, when its turn has come,
// runs its operation.
func (s *Service) take(msg jetstream.Msg, meta *jetstream.MsgMetadata, opID string, log *slog.Logger) {
	ctx := s.ctx
	op, err := s.cfg.Store.GetOperation(ctx, opID)
	switch {
	case errors.Is(err, state.ErrNotFound) && time.Since(meta.Timestamp) < unrecordedGrace:
		// The record may not have reached the replica that answered yet
		// (the job was queued after it was written).
		_ = msg.NakWithDelay(turnDelay(meta.NumDelivered))
		return
	case errors.Is(err, state.ErrNotFound):
		log.Error("dropping job of an unrecorded operation")
		_ = msg.Term()
		return
	case err != nil:
		log.Warn("store unavailable, job will be redelivered", "err", err)
		_ = msg.NakWithDelay(retryDelay)
		return
	case op.Status.Terminal():
		ackJob(msg, s.log) // a copy of a job already done
		return
	}
	if wait, why := s.turn(ctx, msg.Subject(), meta.Sequence.Stream, op); wait {
		log.Debug("not this operation's turn", "why", why)
		_ = msg.NakWithDelay(turnDelay(meta.NumDelivered))
		return
	}
	stopBeat := heartbeat(msg, s.cfg.AckWait)
	defer stopBeat()
	name := s.exclusiveLease(ctx, op)
	if name == "" {
		s.runJob(ctx, msg, opID, log)
		return
	}
	// The lease is taken before a running slot, and not waited for: a job
	// whose VM is busy goes back to the queue and holds no slot meanwhile.
	err = s.leases.Leased(ctx, name, false, func(lctx context.Context) error {
		s.runJob(lctx, msg, opID, log)
		return nil
	})
	switch {
	case errors.Is(err, state.ErrLeaseHeld):
		log.Debug("another attach to the VM runs; waiting for its lease", "lease", name)
		_ = msg.NakWithDelay(turnDelay(meta.NumDelivered))
	case err != nil:
		log.Warn("lease unavailable, job will be redelivered", "lease", name, "err", err)
		_ = msg.NakWithDelay(retryDelay)
	}
}

// exclusiveLease names the lease an operation must hold while it runs, ""
// for none: an attach to a VM whose disks carry no identity, whose device
// is told by size and time, runs alone among the VM's attaches, on
// whichever instance.
func (s *Service) exclusiveLease(ctx context.Context, op commands.Operation) string {
	if op.Type != commands.OpAttach || op.VMID == nil || s.cfg.Devices == nil {
		return ""
	}
	if vm := *op.VMID; s.cfg.Devices.HasAgent(ctx, vm) && s.cfg.Devices.NoIdentity(vm) {
		return engine.LeaseVMPrefix + vm
	}
	return ""
}

// runJob runs a job's operation in a running slot, under ctx (the
// service's, or a lease's), and settles the job message by the result.
func (s *Service) runJob(ctx context.Context, msg jetstream.Msg, opID string, log *slog.Logger) {
	select {
	case s.sem <- struct{}{}:
	case <-ctx.Done():
		_ = msg.NakWithDelay(retryDelay)
		return
	}
	defer func() { <-s.sem }()
	switch s.engine.Run(ctx, opID, log) {
	case engine.Done:
		ackJob(msg, s.log)
	case engine.Lost:
		// Another instance holds the operation now: its delivery acks.
	case engine.Stopped:
		if s.ctx.Err() != nil {
			_ = msg.Nak() // shutting down: to whoever runs next, at once
		} else {
			_ = msg.NakWithDelay(retryDelay) // the store failed, or the lease was lost
		}
	}
}

// turnDelay is how long a job whose turn has not come waits before its
// next delivery.
func turnDelay(delivered uint64) time.Duration {
	return turnBackoff.Delay(int(min(delivered, 64)) - 1)
}

// turn reports whether op must wait, and why: an older job is left on its
// line's subject (JetStream's order is the order of acceptance), or an
// unfinished create made its volume (a create waits in its own line until
// it knows the volume's id, and is older than anything on that volume).
func (s *Service) turn(ctx context.Context, subject string, seq uint64, op commands.Operation) (bool, string) {
	head, err := s.jobs.GetMsg(ctx, 1, jetstream.WithGetMsgSubject(bus.JobsSubjectPrefix+lineOfSubject(subject)+".>"))
	if err != nil && !errors.Is(err, jetstream.ErrMsgNotFound) {
		return true, "queue unavailable: " + err.Error()
	}
	if err == nil && head.Sequence < seq {
		return true, fmt.Sprintf("job %d is first on the line", head.Sequence)
	}
	if lineOf(op) == op.ID {
		return false, "" // a create: nothing on its volume is older
	}
	creates, _, err := s.cfg.Store.ListOperations(ctx, state.Filter{VolumeID: op.VolumeID, Type: commands.OpCreate, Limit: 1})
	if err != nil {
		return true, "store unavailable: " + err.Error()
	}
	if len(creates) == 1 && !creates[0].Status.Terminal() {
		return true, "the create of the volume, " + creates[0].ID + ", has not ended"
	}
	return false, ""
}

// ackJob acks a job and waits for JetStream to confirm, so the next job on
// the line finds this one gone. An ack that is lost leaves the job to be
// delivered again, to find its operation ended.
func ackJob(msg jetstream.Msg, log *slog.Logger) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := msg.DoubleAck(ctx); err != nil {
		log.Warn("job ack not confirmed", "subject", msg.Subject(), "err", err)
	}
}

// heartbeat tells JetStream the job is still being worked on, every third
// of its ack-wait.
func heartbeat(msg jetstream.Msg, ackWait time.Duration) (stop func()) {
	done := make(chan struct{})
	go func() {
		t := time.NewTicker(ackWait / 3)
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
