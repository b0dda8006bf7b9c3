package handlers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/handlers/csapi"
	"github.com/volumed/volumed/state"
)

// Steps recorded on an operation, so a redelivery after a crash knows
// what was already asked of CloudStack.
const (
	stepCreateRequested = "create:requested"
	stepCreateJob       = "create:job"
	stepAttachRequested = "attach:requested"
	stepAttachJob       = "attach:job"
	stepCorrelate       = "attach:correlate"
	stepDetachRequested = "detach:requested"
	stepDetachJob       = "detach:job"
	stepRelease         = "detach:release"
	stepUnexport        = "detach:unexport"
	stepDelete          = "delete:requested"
)

// errStopped: the service is shutting down or the store failed; the
// operation is left as recorded and resumed on redelivery.
var errStopped = errors.New("handlers: stopped before the operation ended")

// errLost: another executor claimed the operation (a later attempt) or
// ended it; this one stops at once, without acking its job.
var errLost = errors.New("handlers: the operation was taken over")

// runResult is how run left an operation.
type runResult int

const (
	// runDone: the operation is terminal; its job is acked.
	runDone runResult = iota
	// runStopped: stopped early (shutdown, store failure); the job is
	// delivered again.
	runStopped
	// runLost: another executor holds the operation; its job is left to
	// that executor's delivery.
	runLost
)

// run executes one operation to a terminal state: it claims the operation
// (attempt + 1), runs its steps and records the end. ctx is the service's,
// or that of a lease the operation runs under.
func (s *Service) run(ctx context.Context, opID string, log *slog.Logger) runResult {
	op, err := s.cfg.Store.GetOperation(ctx, opID)
	if err != nil {
		log.Warn("cannot load operation", "err", err)
		return runStopped
	}
	if op.Status.Terminal() {
		return runDone
	}
	// The claim: attempt + 1 by compare-and-swap. Losing it means another
	// executor claimed the operation since it was read.
	op.Attempts++
	op.Status = commands.StatusExecuting
	if err := s.save(ctx, &op); err != nil {
		if cur, gerr := s.cfg.Store.GetOperation(ctx, opID); gerr == nil && cur.Status.Terminal() {
			return runDone // the read was behind: it had ended
		}
		if errors.Is(err, state.ErrStale) {
			return runLost
		}
		return stopped(err)
	}
	log = log.With("type", op.Type, "volume_id", op.VolumeID)
	log.Info("operation executing", "attempt", op.Attempts, "step", op.Step)
	var resp *commands.OpResponse
	switch op.Type {
	case commands.OpCreate:
		resp, err = s.create(ctx, &op)
	case commands.OpAttach:
		resp, err = s.attach(ctx, &op)
	case commands.OpDetach:
		resp, err = s.detach(ctx, &op)
	case commands.OpDelete:
		resp, err = s.delete(ctx, &op)
	case commands.OpExport:
		resp, err = s.exportOp(ctx, &op)
	case commands.OpUnexport:
		resp, err = s.unexportOp(ctx, &op)
	default:
		err = commands.Internal("unknown operation type %q", op.Type)
	}
	switch {
	case errors.Is(err, errLost):
		log.Warn("operation taken over by another executor; stopping", "step", op.Step)
		return runLost
	case ctx.Err() != nil || errors.Is(err, errStopped):
		log.Info("operation interrupted; it resumes on redelivery", "step", op.Step)
		return runStopped
	}
	status := commands.StatusCompleted
	if err != nil {
		status = commands.StatusFailed
		e := commands.AsError(err)
		op.Error = e.Message
		op.Details = map[string]any{"code": e.Code}
		for k, v := range e.Details {
			op.Details[k] = v
		}
	} else {
		op.Response, op.Error, op.Details = resp, "", nil
	}
	if err := s.finish(ctx, &op, status); err != nil {
		return stopped(err)
	}
	log.Info("operation "+string(status), "err", op.Error, "duration", op.Duration())
	return runDone
}

// stopped maps a failed write of run to its result.
func stopped(err error) runResult {
	if errors.Is(err, errLost) {
		return runLost
	}
	return runStopped
}

// finish records a terminal status.
func (s *Service) finish(ctx context.Context, op *commands.Operation, status commands.OpStatus) error {
	now := time.Now().UTC()
	op.Status, op.CompletedAt = status, &now
	return s.save(ctx, op)
}

// save records the operation by compare-and-swap on the revision it was
// read or last saved at, and publishes its new state. It fails with
// errStopped when the store cannot be written, and with errLost when the
// record moved on: another executor claimed the operation (a later
// attempt) or ended it. A writer that loses never writes its data again;
// the next delivery reads the record and decides.
func (s *Service) save(ctx context.Context, op *commands.Operation) error {
	op.UpdatedAt = time.Now().UTC()
	saved, err := s.cfg.Store.UpdateOperation(ctx, *op)
	if errors.Is(err, state.ErrStale) || errors.Is(err, state.ErrTransition) {
		cur, gerr := s.cfg.Store.GetOperation(ctx, op.ID)
		switch {
		case gerr != nil:
			return fmt.Errorf("%w: %w", errStopped, gerr)
		case cur.Attempts != op.Attempts || cur.Status.Terminal():
			return fmt.Errorf("%w: attempt %d, %s, is recorded", errLost, cur.Attempts, cur.Status)
		}
		// Our own write whose answer was lost, most likely: the next
		// delivery resumes from the record.
	}
	if err != nil {
		s.log.Warn("cannot record operation", "operation_id", op.ID, "err", err)
		return fmt.Errorf("%w: %w", errStopped, err)
	}
	op.Revision = saved.Revision
	s.publish(ctx, *op)
	return nil
}

// publish sends the operation's state on volumes.ops.<id>.
func (s *Service) publish(ctx context.Context, op commands.Operation) {
	data, err := json.Marshal(op)
	if err != nil {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if _, err := s.cfg.JetStream.Publish(ctx, commands.OpSubject(op.ID), data); err != nil {
		s.log.Warn("cannot publish operation event", "operation_id", op.ID, "err", err)
	}
}

// announce publishes data, the first event of an accepted operation, without
// waiting for JetStream's ack: the record, already written, is what the
// answer stands on. It leaves on the connection before the job does, so
// one server stores it before any event of the job's execution (on a
// cluster, whose streams may have other leaders, normally so). It is sent
// once: a failure is logged (here, or by the bus when the ack says so),
// never sent again later, when it could come after the execution's
// events; and a full window of unacknowledged publishes holds the accept
// back at most announceStall.
func (s *Service) announce(opID string, data []byte) {
	if _, err := s.cfg.JetStream.PublishAsync(commands.OpSubject(opID), data,
		jetstream.WithRetryAttempts(0), jetstream.WithStallWait(announceStall)); err != nil {
		s.log.Warn("cannot publish operation event", "operation_id", opID, "err", err)
	}
}

// announceStall bounds how long announce waits for room among the
// unacknowledged publishes.
const announceStall = 50 * time.Millisecond

// step runs fn under the step deadline, retrying retryable CloudStack
// failures with exponential backoff (at least the Retry-After CloudStack
// asked for, and at most RetryLimit times in a row for a limited kind such
// as 530) and recording the last error on the operation. A MaybeDone error
// is returned at once: the caller asks CloudStack what happened. It returns
// a TIMEOUT error when the deadline passes.
func (s *Service) step(ctx context.Context, op *commands.Operation, name string, fn func(ctx context.Context) error) error {
	stepCtx, cancel := context.WithTimeout(ctx, s.cfg.StepTimeout)
	defer cancel()
	backoff := s.cfg.RetryMin
	limited := 0
	for {
		err := fn(stepCtx)
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return errStopped
		}
		if stepCtx.Err() != nil {
			return commands.Timeout("%s did not finish within %v: %v", name, s.cfg.StepTimeout, err).
				WithDetail("step", name)
		}
		var cs *csapi.Error
		if !errors.As(err, &cs) || !cs.Retryable {
			return err
		}
		if cs.RetryLimit > 0 {
			if limited++; limited > cs.RetryLimit {
				final := *cs // retried enough: final, with CloudStack's code and text
				final.Retryable = false
				return &final
			}
		}
		op.Error = fmt.Sprintf("%s: %v (retrying)", name, err)
		if err := s.save(ctx, op); err != nil {
			return err
		}
		select {
		case <-time.After(max(backoff, cs.RetryAfter)):
		case <-stepCtx.Done():
		}
		backoff = min(2*backoff, s.cfg.RetryMax)
	}
}

// settle follows up a call whose answer was lost (or that a crash cut
// off): it asks CloudStack, through check, until check reports the call
// took effect or SettleTimeout passes; done says which. The operation
// shows what it waits for.
func (s *Service) settle(ctx context.Context, op *commands.Operation, name string, check func(ctx context.Context) (bool, error)) (done bool, err error) {
	op.Error = name + ": answer lost; asking CloudStack what happened (retrying)"
	if err := s.save(ctx, op); err != nil {
		return false, err
	}
	deadline := time.Now().Add(s.cfg.SettleTimeout)
	wait := s.cfg.RetryMin
	for {
		done, err := check(ctx)
		if err != nil || done || time.Now().After(deadline) {
			return done, err
		}
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			return false, errStopped
		}
		wait = min(2*wait, time.Second)
	}
}

// volume asks CloudStack for a volume inside a step.
func (s *Service) volume(ctx context.Context, op *commands.Operation, id string) (csapi.Volume, error) {
	var vol csapi.Volume
	err := s.step(ctx, op, "listVolumes", func(ctx context.Context) error {
		var err error
		vol, err = s.cfg.CloudStack.GetVolume(ctx, id)
		return err
	})
	return vol, err
}

// waitJob follows the operation's CloudStack job to its end. A job still
// running at the step's deadline fails the operation with TIMEOUT saying
// so (job_may_run and the job's id); a later reconcile records what became
// of the job (resolveJobs).
func (s *Service) waitJob(ctx context.Context, op *commands.Operation, name string) (csapi.Job, error) {
	var job csapi.Job
	err := s.step(ctx, op, name, func(ctx context.Context) error {
		var err error
		job, err = s.cfg.CloudStack.WaitJob(ctx, op.JobID)
		return err
	})
	var e *commands.Error
	if errors.As(err, &e) && e.Code == commands.CodeTimeout {
		return job, e.WithDetail(commands.DetailJobMayRun, true).WithDetail(commands.DetailJobID, op.JobID)
	}
	return job, err
}

// failure turns a CloudStack error into the operation's error.
func failure(err error) error {
	var cs *csapi.Error
	if errors.As(err, &cs) && !cs.Retryable {
		return cloudStackError(err)
	}
	return err
}

func decodeRequest(op *commands.Operation, v any) error {
	if err := json.Unmarshal(op.Request, v); err != nil {
		return commands.Internal("recorded request of %s is unreadable: %v", op.ID, err)
	}
	return nil
}
