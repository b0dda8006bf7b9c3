// Package retention removes terminal operations older than the retention
// period from the state store, periodically and in batches, so the store's
// memory stays bounded. The store does the removal (Store.PruneOperations,
// with the index entries, atomically per operation); this package only
// decides when.
package retention

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"
)

// Defaults of Config.
const (
	// DefaultRetention keeps terminal operations for 30 days.
	DefaultRetention = 30 * 24 * time.Hour
	// DefaultBatch is how many operations one PruneOperations call removes.
	DefaultBatch = 1000
	// maxInterval and minInterval bound the period between two prunes.
	maxInterval = time.Hour
	minInterval = time.Second
)

// Store is the part of state.Store the pruner uses.
type Store interface {
	PruneOperations(ctx context.Context, completedBefore time.Time, limit int) (int, error)
}

// Config configures a Pruner.
type Config struct {
	// Store is pruned; required.
	Store Store
	// Retention is how long a terminal operation is kept after it ended;
	// it must be positive (the daemon creates no Pruner for 0, "keep
	// everything").
	Retention time.Duration
	// Interval is the period between prunes; default a tenth of Retention,
	// within 1 s and 1 h.
	Interval time.Duration
	// Batch bounds one PruneOperations call; default DefaultBatch.
	Batch int
	// Timeout bounds one PruneOperations call; default 30 s.
	Timeout time.Duration
	// Logger is the parent logger; default slog.Default().
	Logger *slog.Logger
	// Now is the clock; default time.Now.
	Now func() time.Time
}

// Pruner prunes on a timer between Start and Close.
type Pruner struct {
	cfg Config
	log *slog.Logger

	mu      sync.Mutex
	cancel  context.CancelFunc
	done    chan struct{}
	stopped bool
}

// New checks cfg and fills in defaults.
func New(cfg Config) (*Pruner, error) {
	if cfg.Store == nil || cfg.Retention <= 0 {
		return nil, errors.New("retention: a Store and a positive Retention are required")
	}
	if cfg.Interval <= 0 {
		cfg.Interval = min(max(cfg.Retention/10, minInterval), maxInterval)
	}
	if cfg.Batch <= 0 {
		cfg.Batch = DefaultBatch
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 30 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Pruner{cfg: cfg, log: cfg.Logger.With("component", "retention")}, nil
}

// Start prunes once now and then every Interval, in the background.
func (p *Pruner) Start(context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.done != nil || p.stopped {
		return errors.New("retention: already started or closed")
	}
	ctx, cancel := context.WithCancel(context.Background())
	p.cancel, p.done = cancel, make(chan struct{})
	go p.loop(ctx)
	p.log.Info("pruning terminal operations", "retention", p.cfg.Retention, "interval", p.cfg.Interval)
	return nil
}

// Close stops the pruner and waits for a prune under way, within ctx.
// Closing twice is safe.
func (p *Pruner) Close(ctx context.Context) error {
	p.mu.Lock()
	p.stopped = true
	cancel, done := p.cancel, p.done
	p.mu.Unlock()
	if cancel == nil {
		return nil
	}
	cancel()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("retention: close: %w", ctx.Err())
	}
}

func (p *Pruner) loop(ctx context.Context) {
	defer close(p.done)
	t := time.NewTicker(p.cfg.Interval)
	defer t.Stop()
	for {
		if n, err := p.Prune(ctx); err != nil && ctx.Err() == nil {
			p.log.Warn("prune operations", "err", err, "removed", n)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Prune removes every terminal operation that ended more than Retention
// ago, a batch at a time, and returns how many it removed.
func (p *Pruner) Prune(ctx context.Context) (int, error) {
	before := p.cfg.Now().Add(-p.cfg.Retention)
	total := 0
	for ctx.Err() == nil {
		cctx, cancel := context.WithTimeout(ctx, p.cfg.Timeout)
		n, err := p.cfg.Store.PruneOperations(cctx, before, p.cfg.Batch)
		cancel()
		total += n
		if err != nil {
			return total, err
		}
		if n < p.cfg.Batch {
			break
		}
	}
	if total > 0 {
		p.log.Info("pruned operations", "removed", total, "ended_before", before)
	}
	return total, ctx.Err()
}
