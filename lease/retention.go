package lease

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/volumed/volumed/internal/lifecycle"
	"github.com/volumed/volumed/state"
)

// RetentionLease is the lease that makes one instance at a time prune.
const RetentionLease = "retention"

// RetentionConfig configures a Retention.
type RetentionConfig struct {
	// Store is pruned, under its lease.
	Store interface {
		state.Pruner
		state.Leases
	}
	// Keep is how long a terminal operation is kept after it completed;
	// it must be positive (no Retention keeps everything).
	Keep time.Duration
	// Interval between passes; default Keep/10, between one minute and
	// one hour.
	Interval time.Duration
	// Batch bounds the deletions of one PruneOperations call; default 500.
	Batch int
	// Holder names this instance in the lease; default Holder().
	Holder string
	// Logger is the parent logger; default slog.Default().
	Logger *slog.Logger
}

// Retention deletes, at start and then every Interval, the terminal
// operations completed more than Keep ago, under the lease
// RetentionLease so that one instance of several does it. The store
// holds open test failovers (see state.Pruner).
type Retention struct {
	cfg    RetentionConfig
	log    *slog.Logger
	cancel context.CancelFunc
	done   chan struct{}
	closer lifecycle.Stopper
}

// NewRetention checks cfg and fills its defaults.
func NewRetention(cfg RetentionConfig) (*Retention, error) {
	if cfg.Store == nil || cfg.Keep <= 0 {
		return nil, fmt.Errorf("lease: retention needs a store and a positive keep time (got %v)", cfg.Keep)
	}
	if cfg.Interval <= 0 {
		cfg.Interval = min(max(cfg.Keep/10, time.Minute), time.Hour)
	}
	if cfg.Batch <= 0 {
		cfg.Batch = 500
	}
	if cfg.Holder == "" {
		cfg.Holder = Holder()
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &Retention{cfg: cfg, log: cfg.Logger.With("component", "retention"), done: make(chan struct{})}, nil
}

// Start runs the passes until Close.
func (r *Retention) Start(context.Context) error {
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	go func() {
		defer close(r.done)
		t := time.NewTicker(r.cfg.Interval)
		defer t.Stop()
		for {
			if n, err := r.Prune(ctx); err != nil && ctx.Err() == nil {
				r.log.Warn("retention pass failed", "deleted", n, "err", err)
			}
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
	return nil
}

// Prune runs one pass: with the lease (Leaser, renewed while it runs),
// it deletes batches until none is left. It returns how many it deleted;
// 0 and no error when another instance holds the lease. A pass whose
// lease is lost stops; another instance goes on.
func (r *Retention) Prune(ctx context.Context) (int, error) {
	before := time.Now().Add(-r.cfg.Keep)
	if lp, ok := r.cfg.Store.(state.LocalPruner); ok {
		lp.PruneLocal(before) // each instance's own copies, lease or not
	}
	total := 0
	l := &Leaser{Store: r.cfg.Store, Holder: r.cfg.Holder, Log: r.log}
	err := l.Leased(ctx, RetentionLease, false, func(ctx context.Context) error {
		for {
			n, err := r.cfg.Store.PruneOperations(ctx, before, r.cfg.Batch)
			total += n
			if err != nil || n < r.cfg.Batch {
				return err
			}
		}
	})
	if errors.Is(err, state.ErrLeaseHeld) {
		return 0, nil
	}
	if total > 0 {
		r.log.Info("operations pruned", "deleted", total, "completed_before", before)
	}
	return total, err
}

// Close stops the passes and waits for the one running, within ctx.
// Closing twice is safe.
func (r *Retention) Close(ctx context.Context) error {
	err := r.closer.Close(ctx, func() {
		if r.cancel != nil {
			r.cancel()
			<-r.done
		}
	})
	if err != nil {
		return fmt.Errorf("lease: retention close: %w", err)
	}
	return nil
}
