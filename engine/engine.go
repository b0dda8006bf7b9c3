// Package engine runs volumed's operations: it claims an operation by
// compare-and-swap (attempt + 1), hands it to the Kind registered for its
// type, journals every step on the record by compare-and-swap, fences
// every write a step makes by the claim, and records the end. It knows
// nothing of NATS, NBD or device agents: the queue that delivers
// operations (handlers), the kinds (kinds) and the host work (hostwork)
// plug into it.
package engine

import (
	"context"
	"errors"
	"log/slog"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/backoff"
	"github.com/volumed/volumed/state"
)

// Kind is one type of operation: create, attach (attach-root too),
// detach, delete, export, unexport. Execute runs the operation to its end
// from the step the journal shows, first asking whether a step is already
// done, and writes only through the journal and the fenced writers.
type Kind interface {
	// Type is the operation type the kind runs.
	Type() commands.OpType
	// Execute runs j's operation and returns its response, or the error
	// it fails with; ErrLost or ErrStopped (wrapped) stop it unfinished.
	Execute(ctx context.Context, j *Journal) (*commands.OpResponse, error)
}

// Publisher sends an operation's new state on volumes.ops.<id>.
type Publisher interface {
	PublishOperation(ctx context.Context, op commands.Operation)
}

// Timing bounds a step's retries and waits.
type Timing struct {
	// StepTimeout bounds each CloudStack step, job wait included.
	StepTimeout time.Duration
	// Retry is the backoff between retries of a transient failure.
	Retry backoff.Policy
	// SettleTimeout is how long a call whose answer was lost is followed
	// up before it is sent again.
	SettleTimeout time.Duration
}

// Guard holds, while an operation runs, what it must hold alone: the
// handlers' VM lease of an attach to a VM whose disks carry no identity.
type Guard interface {
	// Exclusive runs fn under what op must hold, with a ctx that ends if
	// it is lost; fn runs at once when op needs nothing. It fails with
	// state.ErrLeaseHeld (wrapped) when another holds it now, and runs
	// nothing then.
	Exclusive(ctx context.Context, op commands.Operation, fn func(ctx context.Context)) error
}

// Config configures an Engine.
type Config struct {
	// Operations is the journal's store; required.
	Operations state.Operations
	// Publisher sends operation events; required.
	Publisher Publisher
	// Timing bounds the steps.
	Timing Timing
	// Guard is what a workflow's steps hold while they run (the queue
	// takes it for the operations it delivers); nil holds nothing.
	Guard Guard
	// Jobs is asked what became of the CloudStack job a workflow's step
	// timed out on; nil leaves what such a step did unknown.
	Jobs Jobs
	// Logger receives the engine's logs.
	Logger *slog.Logger
}

// Engine runs operations with the kinds registered by type.
type Engine struct {
	cfg   Config
	kinds map[commands.OpType]Kind
	order []Kind
}

// New returns an Engine running kinds, one per type; a second kind of a
// type already registered panics (a wiring error).
func New(cfg Config, kinds ...Kind) *Engine {
	e := &Engine{cfg: cfg, kinds: map[commands.OpType]Kind{}}
	for _, k := range kinds {
		if _, dup := e.kinds[k.Type()]; dup {
			panic("engine: two kinds of type " + string(k.Type()))
		}
		e.kinds[k.Type()] = k
		e.order = append(e.order, k)
	}
	return e
}

// Kind returns the kind registered for typ, nil if none.
func (e *Engine) Kind(typ commands.OpType) Kind { return e.kinds[typ] }

// Leases (in the store) that serialize work across instances.
const (
	// LeaseSweep: one instance at a time requeues operations whose job is
	// missing.
	LeaseSweep = "sweep"
	// LeaseReconcile: one instance at a time reconciles CloudStack,
	// mappings, devices and exports.
	LeaseReconcile = "reconcile"
	// LeaseVMPrefix + vm id: attaches to a VM whose disks carry no
	// identity run one at a time, from the CloudStack call to the match.
	LeaseVMPrefix = "vm:"
)

// Result is how Run left an operation.
type Result int

const (
	// Done: the operation is terminal; its job is acked.
	Done Result = iota
	// Stopped: stopped early (shutdown, store failure); the job is
	// delivered again.
	Stopped
	// Lost: another executor holds the operation; its job is left to that
	// executor's delivery.
	Lost
)

// Run executes one operation to a terminal state: it claims the operation
// (attempt + 1), runs its kind and records the end. ctx is the caller's,
// or that of a lease the operation runs under. An executor that finds it
// lost the operation writes nothing more and logs why.
func (e *Engine) Run(ctx context.Context, opID string, log *slog.Logger) Result {
	return e.run(ctx, opID, log, nil)
}

// RunRead is Run of op as its caller read it from the store, which saves
// Run's read: the claim is a compare-and-swap on op's revision. A claim
// lost to a record that moved since without being claimed (its attempt
// unchanged) is made again on the record as it is now, as Run would have.
func (e *Engine) RunRead(ctx context.Context, op commands.Operation, log *slog.Logger) Result {
	return e.claimAndRun(ctx, op, log, nil, true)
}

// run is Run; parent, when set, is the journal of the workflow whose step
// the operation is: every write of the step is fenced by its claim too.
func (e *Engine) run(ctx context.Context, opID string, log *slog.Logger, parent *Journal) Result {
	op, err := e.cfg.Operations.GetOperation(ctx, opID)
	if err != nil {
		log.Warn("cannot load operation", "err", err)
		return Stopped
	}
	return e.claimAndRun(ctx, op, log, parent, false)
}

// claimAndRun claims op, read at op.Revision, runs its kind and records
// the end. reread: op was read by the caller, some time ago, and a claim
// lost to a record that moved without a claim is made again on the record
// read then.
//
// The claim of a pending operation that is no workflow's step is written
// with the operation's first save (its first step, or a fence check)
// rather than on its own: a kind saves a step, or checks its fence, before
// it changes anything, so until then it has only read, and an executor
// whose first write finds the record moved since it was read (another
// executor's claim or step, or an end) has done nothing, and stops. An
// operation that ran before is claimed at once: the claim fences its
// earlier executor from the start.
func (e *Engine) claimAndRun(ctx context.Context, op commands.Operation, log *slog.Logger, parent *Journal, reread bool) Result {
	if op.Status.Terminal() {
		return Done
	}
	read := op.Attempts
	lazy := parent == nil && op.Status == commands.StatusPending
	// The claim: attempt + 1 by compare-and-swap. Losing it means another
	// executor claimed the operation since it was read.
	op.Attempts++
	op.Status = commands.StatusExecuting
	j := e.journal(&op, log)
	j.parent, j.unclaimed = parent, true
	if !lazy {
		if err := j.Save(ctx); err != nil {
			return e.notClaimed(ctx, op, read, err, log, parent, reread)
		}
	}
	res := e.execute(ctx, j)
	if res == Lost && j.unclaimed {
		return e.notClaimed(ctx, op, read, ErrLost, log, parent, reread)
	}
	return res
}

// notClaimed settles the run of op, claimed as attempt read + 1, whose
// claim could not be written (err).
func (e *Engine) notClaimed(ctx context.Context, op commands.Operation, read int, err error, log *slog.Logger, parent *Journal, reread bool) Result {
	cur, gerr := e.cfg.Operations.GetOperation(ctx, op.ID)
	switch {
	case gerr == nil && cur.Status.Terminal():
		return Done // the read was behind: it had ended
	case !errors.Is(err, ErrLost):
		return e.stopped(log, &op, err)
	case reread && gerr == nil && cur.Attempts == read:
		return e.claimAndRun(ctx, cur, log, parent, false)
	}
	log.Info("operation claimed by another executor; not running it", "attempt", op.Attempts, "err", err)
	return Lost
}

// execute runs the kind of j's claimed operation and records its end.
func (e *Engine) execute(ctx context.Context, j *Journal) Result {
	op, log := j.Op, j.log
	j.log = log.With("type", op.Type, "volume_id", op.VolumeID, "attempt", op.Attempts)
	log = j.log
	log.Info("operation executing", "step", op.Step)
	var (
		resp *commands.OpResponse
		err  error
	)
	if k := e.kinds[op.Type]; k == nil {
		err = commands.Internal("unknown operation type %q", op.Type)
	} else {
		resp, err = k.Execute(ctx, j)
	}
	switch {
	case errors.Is(err, ErrLost) && j.unclaimed:
		return Lost // its caller tells why
	case errors.Is(err, ErrLost):
		log.Warn("operation taken over by another executor; stopping, nothing more written", "step", op.Step, "err", err)
		return Lost
	case ctx.Err() != nil || errors.Is(err, ErrStopped):
		log.Info("operation interrupted; it resumes on redelivery", "step", op.Step, "err", err)
		return Stopped
	}
	if j.unclaimed {
		// The kind saved nothing: the claim first, so that the record
		// moves through executing to its end.
		if serr := j.Save(ctx); errors.Is(serr, ErrLost) {
			return Lost // its caller tells why
		} else if serr != nil {
			return e.stopped(log, op, serr)
		}
	}
	status := commands.StatusCompleted
	if err != nil {
		status = commands.StatusFailed
		ce := commands.AsError(err)
		op.Error = ce.Message
		op.Details = map[string]any{"code": ce.Code}
		for k, v := range ce.Details {
			op.Details[k] = v
		}
	} else {
		op.Response, op.Error, op.Details = resp, "", nil
	}
	now := time.Now().UTC()
	op.Status, op.CompletedAt = status, &now
	if err := j.Save(ctx); err != nil {
		return e.stopped(log, op, err)
	}
	log.Info("operation "+string(status), "err", op.Error, "duration", op.Duration())
	return Done
}

// stopped maps a failed write of Run to its result, and logs it.
func (e *Engine) stopped(log *slog.Logger, op *commands.Operation, err error) Result {
	if errors.Is(err, ErrLost) {
		log.Warn("operation taken over by another executor; stopping, nothing more written", "step", op.Step, "err", err)
		return Lost
	}
	log.Info("operation interrupted; it resumes on redelivery", "step", op.Step, "err", err)
	return Stopped
}

// journal returns the journal of op, claimed or about to be.
func (e *Engine) journal(op *commands.Operation, log *slog.Logger) *Journal {
	return &Journal{Op: op, ops: e.cfg.Operations, pub: e.cfg.Publisher, timing: e.cfg.Timing, log: log, eng: e}
}
