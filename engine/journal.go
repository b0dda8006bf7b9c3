package engine

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/internal/backoff"
	"github.com/volumed/volumed/state"
)

// ErrStopped: the engine is shutting down or the store failed; the
// operation is left as recorded and resumed on redelivery.
var ErrStopped = errors.New("engine: stopped before the operation ended")

// ErrLost: another executor claimed the operation (a later attempt) or
// ended it; this one stops at once, writes nothing more, and does not ack
// its job.
var ErrLost = errors.New("engine: the operation was taken over")

// Fence proves, before a write, that its writer still holds what allows
// the write; nil means an unfenced writer (the reconcile, which writes by
// compare-and-swap on what it read, under its lease).
type Fence interface {
	// Check returns nil while the claim holds, an error wrapping ErrLost
	// once another executor claimed or ended the operation, and one
	// wrapping ErrStopped when it cannot tell.
	Check(ctx context.Context) error
}

// Journal is one claimed operation's record: the kind sets the operation's
// step, job, volume or error and saves it, by compare-and-swap on the
// revision it holds. It is also the operation's Fence.
type Journal struct {
	// Op is the claimed operation, as last saved.
	Op     *commands.Operation
	ops    state.Operations
	pub    Publisher
	timing Timing
	log    *slog.Logger
	// eng runs the children of a workflow (RunChild); nil in a journal
	// made by NewJournal.
	eng *Engine
	// parent is the journal of the workflow this operation is a step of:
	// its claim fences every write of this one too.
	parent *Journal
	// unclaimed: Op holds the claim (attempt + 1, executing), not written
	// yet; the first Save writes it (Engine.claimAndRun).
	unclaimed bool
}

var _ Fence = (*Journal)(nil)

// NewJournal returns the journal of op, claimed at op.Revision, for a
// kind's test or a caller that claimed op itself.
func NewJournal(op *commands.Operation, ops state.Operations, pub Publisher, timing Timing, log *slog.Logger) *Journal {
	return &Journal{Op: op, ops: ops, pub: pub, timing: timing, log: log}
}

// Save records the operation by compare-and-swap on the revision it was
// read or last saved at, and publishes its new state; a workflow's step
// first checks the workflow's claim (Check). It fails with
// ErrStopped when the store cannot be written, and with ErrLost when the
// record moved on: another executor claimed the operation (a later
// attempt) or ended it. A writer that loses never writes its data again;
// the next delivery reads the record and decides.
func (j *Journal) Save(ctx context.Context) error {
	if j.parent != nil {
		if err := j.parent.Check(ctx); err != nil {
			return err
		}
	}
	op := j.Op
	op.UpdatedAt = time.Now().UTC()
	saved, err := j.ops.UpdateOperation(ctx, *op)
	if (errors.Is(err, state.ErrStale) || errors.Is(err, state.ErrTransition)) && j.unclaimed {
		return fmt.Errorf("%w: the record moved since it was read: %w", ErrLost, err)
	}
	if errors.Is(err, state.ErrStale) || errors.Is(err, state.ErrTransition) {
		cur, gerr := j.ops.GetOperation(ctx, op.ID)
		switch {
		case gerr != nil:
			return fmt.Errorf("%w: %w", ErrStopped, gerr)
		case cur.Attempts != op.Attempts || cur.Status.Terminal():
			return fmt.Errorf("%w: attempt %d, %s, is recorded", ErrLost, cur.Attempts, cur.Status)
		}
		// Our own write whose answer was lost, most likely: the next
		// delivery resumes from the record.
	}
	if err != nil {
		j.log.Warn("cannot record operation", "operation_id", op.ID, "err", err)
		return fmt.Errorf("%w: %w", ErrStopped, err)
	}
	op.Revision, j.unclaimed = saved.Revision, false
	j.pub.PublishOperation(ctx, *op)
	return nil
}

// Check is the claim's fence: it reads the record and returns nil only if
// it is still at the revision this executor last saved (and, for a
// workflow's step, the workflow's record too). A later attempt,
// or an end, is ErrLost; any other change (a write of ours whose answer
// was lost) is ErrStopped, and the next delivery decides from the record.
func (j *Journal) Check(ctx context.Context) error {
	if j.unclaimed {
		// The claim, not written yet, is written now: its compare-and-swap
		// on the revision read is the check.
		return j.Save(ctx)
	}
	if j.parent != nil {
		if err := j.parent.Check(ctx); err != nil {
			return err
		}
	}
	cur, err := j.ops.GetOperation(ctx, j.Op.ID)
	switch {
	case err != nil:
		return fmt.Errorf("%w: fence: %w", ErrStopped, err)
	case cur.Attempts != j.Op.Attempts || cur.Status.Terminal():
		return fmt.Errorf("%w: attempt %d (%s) is recorded, this executor holds attempt %d", ErrLost, cur.Attempts, cur.Status, j.Op.Attempts)
	case cur.Revision != j.Op.Revision:
		return fmt.Errorf("%w: fence: the record moved to revision %d from %d", ErrStopped, cur.Revision, j.Op.Revision)
	}
	return nil
}

// Step runs fn, a call that may change something (a CloudStack command),
// under the step deadline, retrying retryable CloudStack failures with the
// engine's backoff (at least the Retry-After CloudStack asked for, and at
// most RetryLimit times in a row for a limited kind such as 530) and
// recording the last error on the operation. A MaybeDone error is
// returned at once: the caller asks CloudStack what happened. It returns a
// TIMEOUT error when the deadline passes. A claim not written yet is
// written first: no executor acts before its claim holds, even in a kind
// that saved nothing before the call.
func (j *Journal) Step(ctx context.Context, name string, fn func(ctx context.Context) error) error {
	if j.unclaimed {
		if err := j.Save(ctx); err != nil {
			return err
		}
	}
	return j.step(ctx, name, true, fn)
}

// Read is Step for a call that only reads (a CloudStack list or query):
// it leaves a claim not written yet to the operation's first save.
func (j *Journal) Read(ctx context.Context, name string, fn func(ctx context.Context) error) error {
	return j.step(ctx, name, false, fn)
}

// step is Step without the claim; a call that changes something is sent
// again after a retry's wait only while the fence holds.
func (j *Journal) step(ctx context.Context, name string, changes bool, fn func(ctx context.Context) error) error {
	stepCtx, cancel := context.WithTimeout(ctx, j.timing.StepTimeout)
	defer cancel()
	wait := j.timing.Retry.Start()
	limited := 0
	for {
		err := fn(stepCtx)
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return fmt.Errorf("%w: %s: %w", ErrStopped, name, context.Cause(ctx))
		}
		if stepCtx.Err() != nil {
			return commands.Timeout("%s did not finish within %v: %v", name, j.timing.StepTimeout, err).
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
		j.Op.Error = fmt.Sprintf("%s: %v (retrying)", name, err)
		if err := j.Save(ctx); err != nil {
			return err
		}
		wait.Wait(stepCtx, cs.RetryAfter)
		if changes {
			if err := j.Check(ctx); err != nil {
				return err
			}
		}
	}
}

// Settle follows up a call whose answer was lost (or that a crash cut
// off): it asks CloudStack, through check, until check reports the call
// took effect or the settle timeout passes; done says which. The
// operation shows what it waits for.
func (j *Journal) Settle(ctx context.Context, name string, check func(ctx context.Context) (bool, error)) (done bool, err error) {
	j.Op.Error = name + ": answer lost; asking CloudStack what happened (retrying)"
	if err := j.Save(ctx); err != nil {
		return false, err
	}
	deadline := time.Now().Add(j.timing.SettleTimeout)
	tm := backoff.Policy{Min: j.timing.Retry.Min, Max: time.Second}.Start()
	for {
		done, err := check(ctx)
		if err != nil || done || time.Now().After(deadline) {
			return done, err
		}
		if !tm.Wait(ctx, 0) {
			return false, fmt.Errorf("%w: %s: %w", ErrStopped, name, context.Cause(ctx))
		}
	}
}

// Decode reads the operation's recorded request into v.
func (j *Journal) Decode(v any) error { return DecodeRequest(j.Op, v) }

// DecodeRequest reads op's recorded request into v.
func DecodeRequest(op *commands.Operation, v any) error {
	if err := json.Unmarshal(op.Request, v); err != nil {
		return commands.Internal("recorded request of %s is unreadable: %v", op.ID, err)
	}
	return nil
}
