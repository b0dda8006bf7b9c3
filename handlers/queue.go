package handlers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/engine"
	"github.com/volumed/volumed/internal/backoff"
	"github.com/volumed/volumed/internal/formation"
	"github.com/volumed/volumed/internal/jsget"
	"github.com/volumed/volumed/lease"
	"github.com/volumed/volumed/state"
)

// job is the queued message of an accepted operation.
type job struct {
	OperationID string `json:"operation_id"`
	// Hold marks a message that only holds one more line of an operation
	// on several volumes: it never runs the operation.
	Hold bool `json:"hold,omitempty"`
}

// lineOf names the line an operation's job runs in: its volume (the first
// of those it names), or, for a create (whose volume does not exist yet),
// the operation itself. The line never changes during the operation's
// life, so every copy of its job is on the same subject.
func lineOf(op commands.Operation) string {
	switch {
	case op.Type == commands.OpCreate:
		return op.ID
	case op.VolumeID != "":
		return op.VolumeID
	case len(op.VolumeIDs) > 0:
		return op.VolumeIDs[0]
	}
	return op.ID
}

// linesOf lists every line an operation holds: the one its job runs in
// first, then that of each other volume it names.
func linesOf(op commands.Operation) []string {
	lines := []string{lineOf(op)}
	for _, v := range op.VolumeIDs {
		if !slices.Contains(lines, v) {
			lines = append(lines, v)
		}
	}
	return lines
}

// lineSubject is the subject of an operation's message on a line:
// volumed.jobs.<line>.<operation_id>.
func lineSubject(line, opID string) string {
	return bus.JobsSubjectPrefix + line + "." + opID
}

// jobSubject is the subject of the message that runs an operation, on its
// first line.
func jobSubject(op commands.Operation) string {
	return lineSubject(lineOf(op), op.ID)
}

// enqueue publishes the job of an accepted operation on its line (on each
// of its lines, for an operation on several volumes). The operation id is
// the message id, so JetStream drops a copy published within the dedup
// window; a later copy waits behind the first in the line and finds the
// operation ended.
func (s *Service) enqueue(ctx context.Context, op commands.Operation) error {
	_, _, err := s.publishJob(ctx, op, op.ID)
	return err
}

// publishJob publishes op's job under message id msgID and reports whether
// JetStream kept it (false: a duplicate within the dedup window) and, if
// so, its stream sequence.
func (s *Service) publishJob(ctx context.Context, op commands.Operation, msgID string) (uint64, bool, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if lines := linesOf(op); len(lines) > 1 {
		return s.publishBatch(ctx, op, lines, msgID)
	}
	data, _ := json.Marshal(job{OperationID: op.ID})
	ack, err := s.cfg.JetStream.Publish(ctx, jobSubject(op), data, jetstream.WithMsgID(msgID))
	if err != nil {
		return 0, false, err
	}
	return ack.Sequence, !ack.Duplicate, nil
}

// Headers of a JetStream atomic batch (nats-server 2.12 and later).
const (
	batchIDHeader     = "Nats-Batch-Id"
	batchSeqHeader    = "Nats-Batch-Sequence"
	batchCommitHeader = "Nats-Batch-Commit"
)

// JetStream's answers to an atomic batch that publishBatch tells apart.
const (
	errBatchDisabled     jetstream.ErrorCode = 10174 // the stream does not allow atomic publish
	errBatchIncomplete   jetstream.ErrorCode = 10176 // a message of the batch did not arrive
	errBatchDuplicate    jetstream.ErrorCode = 10201 // a message id of the batch is stored already
	errBatchTooMany      jetstream.ErrorCode = 10210 // too many batches in flight on the stream
	errDuplicateInFlight jetstream.ErrorCode = 10158 // the same message id is being stored now
)

// batchBackoff paces the attempts at a batch JetStream could not take
// yet (too many in flight, a message lost on the way).
var batchBackoff = backoff.Policy{Min: 10 * time.Millisecond, Max: 200 * time.Millisecond}

// errAtomicPublishOff: the job stream does not take atomic batches, so an
// operation on several volumes cannot be queued.
var errAtomicPublishOff = errors.New("stream " + bus.StreamJobs + " does not allow atomic publish (a volumed from before it, or a NATS server before 2.12, turned it off: upgrade every instance)")

// publishBatch publishes the job of an operation on several lines as one
// JetStream atomic batch: the job on its first line, then a hold on each
// other line, all stored or none, under consecutive stream sequences (no
// other message comes between them). msgID, on the job, makes a batch
// sent again within the dedup window a duplicate, dropped whole. A batch
// JetStream could not take yet, or whose message id is still being stored
// (an earlier attempt, which may yet fail), is sent again, under a new
// batch id, until ctx ends. It returns what publishJob does, the sequence
// of the job.
func (s *Service) publishBatch(ctx context.Context, op commands.Operation, lines []string, msgID string) (uint64, bool, error) {
	pause := batchBackoff.Start()
	for {
		first, err := s.sendBatch(ctx, op, lines, msgID)
		var apiErr *jetstream.APIError
		if errors.As(err, &apiErr) {
			switch apiErr.ErrorCode {
			case errBatchDuplicate:
				return 0, false, nil
			case errBatchDisabled:
				return 0, false, fmt.Errorf("%w: %w", errAtomicPublishOff, err)
			case errBatchTooMany, errBatchIncomplete, errDuplicateInFlight:
				if backoff.Sleep(ctx, pause.Next()) {
					continue
				}
			}
		}
		if err != nil {
			return 0, false, err
		}
		return first, true, nil
	}
}

// sendBatch sends one atomic batch of op's messages, one per line, and
// returns the stream sequence of the first (its job). The messages before
// the last are core publishes on the same connection, in order; the last
// commits the batch and is answered with the batch's last sequence.
func (s *Service) sendBatch(ctx context.Context, op commands.Operation, lines []string, msgID string) (uint64, error) {
	nc := s.cfg.JetStream.Conn()
	batch := uuid.NewString()
	for i, line := range lines {
		m := nats.NewMsg(lineSubject(line, op.ID))
		m.Data, _ = json.Marshal(job{OperationID: op.ID, Hold: i > 0})
		m.Header.Set(batchIDHeader, batch)
		m.Header.Set(batchSeqHeader, strconv.Itoa(i+1))
		if i == 0 {
			m.Header.Set(jetstream.MsgIDHeader, msgID)
		}
		if i < len(lines)-1 {
			if err := nc.PublishMsg(m); err != nil {
				return 0, err
			}
			continue
		}
		m.Header.Set(batchCommitHeader, "1")
		ack, err := s.cfg.JetStream.PublishMsg(ctx, m)
		if err != nil {
			return 0, err
		}
		return ack.Sequence - uint64(len(lines)-1), nil
	}
	return 0, errors.New("an empty batch") // linesOf has one line at least
}

// removeHolds deletes op's holds queued before stream sequence before
// (all of them: math.MaxUint64), so the next job on each of its other
// lines does not wait for them; each is the first of op's messages on its
// subject. One that is not deleted now is acked when next delivered (its
// operation ended, or a later job of it queued).
func (s *Service) removeHolds(ctx context.Context, op commands.Operation, before uint64) {
	for _, line := range linesOf(op)[1:] {
		subject := lineSubject(line, op.ID)
		for {
			msg, err := s.jobMsg(ctx, 1, subject)
			if errors.Is(err, jetstream.ErrMsgNotFound) || err == nil && msg.Sequence >= before {
				break
			}
			if err == nil {
				err = s.jobs.DeleteMsg(ctx, msg.Sequence)
			}
			if err != nil && !errors.Is(err, jetstream.ErrMsgNotFound) {
				s.log.Warn("hold not removed; it is acked when delivered", "operation_id", op.ID, "subject", subject, "err", err)
				break
			}
		}
	}
}

// requeueMissing queues op's job again if the work queue has none (its
// publish was lost: a crash between the record and the job) and reports
// whether it did; an operation on several volumes is queued again whole
// (job and holds, one batch), and its earlier holds removed. Not the
// operation id as message id: the first job may have been lost within the
// dedup window. The revision keeps two callers that read the same record
// from queueing it twice.
func (s *Service) requeueMissing(ctx context.Context, op commands.Operation) (bool, error) {
	queued, err := s.jobQueued(ctx, op)
	if err != nil {
		return false, commands.Unavailable("command queue unavailable: %v", err)
	}
	if queued {
		return false, nil
	}
	seq, kept, err := s.publishJob(ctx, op, fmt.Sprintf("%s@%d", op.ID, op.Revision))
	if err != nil {
		return false, commands.Unavailable("command queue unavailable: %v", err)
	}
	if kept {
		s.removeHolds(ctx, op, seq)
	}
	return kept, nil
}

// jobMsg reads the first message of the jobs stream on subject from
// sequence seq (jsget.Get: a direct get, or the leader's answer).
func (s *Service) jobMsg(ctx context.Context, seq uint64, subject string) (*jetstream.RawStreamMsg, error) {
	return jsget.Get(ctx, s.jobs, func() (*jetstream.RawStreamMsg, error) {
		return s.jobs.GetMsg(ctx, seq, jetstream.WithGetMsgSubject(subject))
	})
}

// jobQueued reports whether the operation's job is in the work queue
// (waiting, or delivered and not acked); its holds are not looked at.
func (s *Service) jobQueued(ctx context.Context, op commands.Operation) (bool, error) {
	_, err := s.jobMsg(ctx, 1, jobSubject(op))
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
// crash, to another instance if need be. A workflow's steps (ParentID) are
// never queued: their parent runs them.
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
			if op.ParentID != "" {
				continue // a workflow's step: its parent's executor runs it
			}
			kept, err := s.requeueMissing(ctx, op)
			if err != nil {
				return changes, err
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
		s.take(msg, meta, j, log)
	}()
}

// take decides what to do with a job message and, when its turn has come,
// runs its operation under the guard.
func (s *Service) take(msg jetstream.Msg, meta *jetstream.MsgMetadata, j job, log *slog.Logger) {
	ctx := s.ctx
	op, err := s.jobOperation(ctx, j.OperationID, meta.NumDelivered == 1)
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
		if !j.Hold {
			s.removeHolds(ctx, op, math.MaxUint64) // its runner may have stopped before
		}
		ackJob(msg, s.log) // a copy of a job already done
		return
	case j.Hold:
		s.hold(ctx, msg, meta, op, log)
		return
	}
	if wait, why := s.turn(ctx, meta.Sequence.Stream, op); wait {
		log.Debug("not this operation's turn", "why", why)
		_ = msg.NakWithDelay(turnDelay(meta.NumDelivered))
		return
	}
	stopBeat := heartbeat(msg, s.cfg.AckWait)
	defer stopBeat()
	// The running slot first, then the guard, not waited for: a job whose
	// VM is busy goes back to the queue and holds no slot meanwhile, and
	// whoever holds a guard holds a slot and runs (a workflow's step that
	// waits for a guard never waits on a job that waits for a slot).
	select {
	case s.sem <- struct{}{}:
	case <-ctx.Done():
		_ = msg.NakWithDelay(retryDelay)
		return
	}
	defer func() { <-s.sem }()
	err = s.guard.Exclusive(ctx, op, func(ctx context.Context) {
		s.runJob(ctx, msg, op, log)
	})
	switch {
	case errors.Is(err, state.ErrLeaseHeld):
		log.Debug("another attach to the VM runs; waiting for its lease", "err", err)
		_ = msg.NakWithDelay(turnDelay(meta.NumDelivered))
	case err != nil:
		log.Warn("lease unavailable, job will be redelivered", "err", err)
		_ = msg.NakWithDelay(retryDelay)
	}
}

// jobOperation reads the operation a job names. On its first delivery
// (first) that is from the store's memory when it holds the record
// (state.RecentOperations: the embedded store has the records this
// process wrote lately, and those its watcher saw); else, and on a
// redelivery, from the store. Memory may be a moment behind the store, as
// any read is by the time the operation runs: what is decided on it is
// written by compare-and-swap on its revision, and a claim that finds the
// record moved reads it again (engine.RunRead). An end it holds is final.
func (s *Service) jobOperation(ctx context.Context, id string, first bool) (commands.Operation, error) {
	if r, ok := s.cfg.Store.(state.RecentOperations); ok && first {
		if op, ok := r.RecentOperation(id); ok {
			return op, nil
		}
	}
	return s.cfg.Store.GetOperation(ctx, id)
}

// holdBackoff bounds the wait of a hold whose operation has not ended; it
// doubles with each delivery. The operation's runner removes its holds
// when it ends, so this only bounds how long a hold outlives a runner
// that stopped before.
var holdBackoff = backoff.Policy{Min: 100 * time.Millisecond, Max: 2 * time.Second}

// hold settles a delivered hold of an unfinished operation: it stays
// (nak'd with a delay) while it holds its line for the operation's job,
// and is acked once a later job of the operation was queued (the whole
// batch queued again: that batch holds the lines now).
func (s *Service) hold(ctx context.Context, msg jetstream.Msg, meta *jetstream.MsgMetadata, op commands.Operation, log *slog.Logger) {
	run, err := s.jobMsg(ctx, 1, jobSubject(op))
	switch {
	case err == nil && run.Sequence > meta.Sequence.Stream:
		log.Debug("hold of an earlier batch of the operation; dropping it", "subject", msg.Subject())
		ackJob(msg, s.log)
	case err != nil && !errors.Is(err, jetstream.ErrMsgNotFound):
		_ = msg.NakWithDelay(retryDelay)
	default:
		// Its job is queued before it, or lost (the sweep queues the batch
		// again): the line stays held.
		_ = msg.NakWithDelay(holdBackoff.Delay(int(min(meta.NumDelivered, 64)) - 1))
	}
}

// vmGuard is the engine.Guard of the queue and of a workflow's steps: an
// attach to a VM whose disks carry no identity, whose device is told by
// size and time, runs alone among the VM's attaches, on whichever
// instance, under the store lease engine.LeaseVMPrefix + the VM's id.
type vmGuard struct {
	devices DeviceCorrelator
	leases  *lease.Leaser
}

var _ engine.Guard = vmGuard{}

// Exclusive runs fn under op's VM lease, or at once when op needs none;
// it fails with state.ErrLeaseHeld (wrapped), running nothing, while
// another holds the lease.
func (g vmGuard) Exclusive(ctx context.Context, op commands.Operation, fn func(ctx context.Context)) error {
	name := g.lease(ctx, op)
	if name == "" {
		fn(ctx)
		return nil
	}
	return g.leases.Leased(ctx, name, false, func(ctx context.Context) error {
		fn(ctx)
		return nil
	})
}

// lease names the lease op must hold while it runs, "" for none.
func (g vmGuard) lease(ctx context.Context, op commands.Operation) string {
	if op.Type != commands.OpAttach || op.VMID == nil || g.devices == nil {
		return ""
	}
	if vm := *op.VMID; g.devices.HasAgent(ctx, vm) && g.devices.NoIdentity(vm) {
		return engine.LeaseVMPrefix + vm
	}
	return ""
}

// runJob runs a job's operation, as take read it, in the running slot its
// caller holds, under ctx (the service's, or a lease's), and settles the
// job message by the result: an operation that ended has its holds
// removed, then its job acked.
func (s *Service) runJob(ctx context.Context, msg jetstream.Msg, op commands.Operation, log *slog.Logger) {
	switch s.engine.RunRead(ctx, op, log) {
	case engine.Done:
		s.removeHolds(context.WithoutCancel(ctx), op, math.MaxUint64)
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

// turn reports whether op, whose job is stream sequence seq, must wait,
// and why: on one of its lines (it has several when it names several
// volumes) a message older than its job is left (JetStream's order is the
// order of acceptance), or an unfinished create made one of its volumes (a
// create waits in its own line until it knows the volume's id, and is
// older than anything on that volume). Its own messages older than its
// job, holds of an earlier batch of it, are passed over.
//
// No deadlock: an operation waits only for older ones, and the messages
// of an operation on several lines are one atomic batch, of consecutive
// sequences, so any two operations are in the same order on every line
// they share.
func (s *Service) turn(ctx context.Context, seq uint64, op commands.Operation) (bool, string) {
	for i, line := range linesOf(op) {
		own := lineSubject(line, op.ID)
		for from := uint64(1); ; {
			head, err := s.jobMsg(ctx, from, bus.JobsSubjectPrefix+line+".>")
			switch {
			case errors.Is(err, jetstream.ErrMsgNotFound):
			case err != nil:
				return true, "queue unavailable: " + err.Error()
			case head.Sequence < seq && i > 0 && head.Subject == own:
				from = head.Sequence + 1
				continue
			case head.Sequence < seq:
				return true, fmt.Sprintf("job %d is first on the line %s", head.Sequence, line)
			}
			break
		}
	}
	for _, v := range linesOf(op) {
		if v == op.ID || s.createsEnded.has(v) {
			continue // a create (nothing on its volume is older), or a volume whose create ended
		}
		create, found, err := state.FirstOperation(ctx, s.cfg.Store, state.Filter{VolumeID: v, Type: commands.OpCreate})
		if err != nil {
			return true, "store unavailable: " + err.Error()
		}
		if found {
			if !create.Status.Terminal() {
				return true, "the create of the volume, " + create.ID + ", has not ended"
			}
			s.createsEnded.add(v)
		}
	}
	return false, ""
}

// endedCreatesKept bounds the volumes endedCreates remembers.
const endedCreatesKept = 4096

// endedCreates remembers volumes whose create has ended, so that the turn
// of a later job on such a volume does not ask the store again. It holds
// only that fact, which no instance can undo: a create's end is final, and
// no second create claims a volume that an operation names (a create
// adopts only a volume no operation names). The oldest are forgotten
// first; a volume forgotten is asked about again.
type endedCreates struct {
	mu   sync.Mutex
	set  map[string]struct{}
	ring [endedCreatesKept]string
	next int
}

// has reports whether volumeID's create is known to have ended.
func (e *endedCreates) has(volumeID string) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	_, ok := e.set[volumeID]
	return ok
}

// add records that volumeID's create has ended.
func (e *endedCreates) add(volumeID string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if _, ok := e.set[volumeID]; ok {
		return
	}
	if e.set == nil {
		e.set = make(map[string]struct{}, endedCreatesKept)
	}
	delete(e.set, e.ring[e.next])
	e.ring[e.next] = volumeID
	e.set[volumeID] = struct{}{}
	e.next = (e.next + 1) % endedCreatesKept
}

// noteEnded records the end of a create that names its volume.
func (e *endedCreates) noteEnded(op commands.Operation) {
	if op.Type == commands.OpCreate && op.VolumeID != "" && op.Status.Terminal() {
		e.add(op.VolumeID)
	}
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
