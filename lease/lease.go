// Package lease runs work under the state store's named leases: the one
// lease implementation (Leaser), and the retention that prunes old
// operations under it.
package lease

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/google/uuid"

	"github.com/volumed/volumed/internal/backoff"
	"github.com/volumed/volumed/state"
)

// Leaser runs work under the store's named leases: the one lease
// implementation (acquire, renew every third of the TTL, end the work's
// context when the lease is lost, release).
type Leaser struct {
	// Store holds the leases.
	Store state.Leases
	// Holder names this process (Holder()).
	Holder string
	// Log receives lost and unreleased leases.
	Log *slog.Logger
}

// Holder names this process in leases: host and pid, spelled one way
// for every lease volumed takes.
func Holder() string {
	host, _ := os.Hostname()
	return fmt.Sprintf("%s/%d", host, os.Getpid())
}

// leaseTTL is how long a lease outlives a holder that stopped renewing
// it (a crash); it is renewed every third of it.
const leaseTTL = 15 * time.Second

// Leased runs fn holding the lease name. With waiting false it returns
// state.ErrLeaseHeld at once when another instance holds the lease;
// otherwise it waits for it until ctx ends. fn's context ends when the
// lease is lost (not renewed in time), so work that needs exclusivity
// stops.
func (l *Leaser) Leased(ctx context.Context, name string, waiting bool, fn func(ctx context.Context) error) error {
	// Each acquisition is its own holder: the store lets a holder take its
	// lease again, and two goroutines of this process must exclude each
	// other too.
	holder := l.Holder + "/" + uuid.NewString()[:8]
	lease, err := l.Store.AcquireLease(ctx, name, holder, leaseTTL)
	for wait := (backoff.Policy{Min: 50 * time.Millisecond, Max: time.Second}).Start(); waiting && errors.Is(err, state.ErrLeaseHeld); {
		if !wait.Wait(ctx, 0) {
			return fmt.Errorf("lease %s: %w", name, ctx.Err())
		}
		lease, err = l.Store.AcquireLease(ctx, name, holder, leaseTTL)
	}
	if err != nil {
		return fmt.Errorf("lease %s: %w", name, err)
	}
	fctx, cancel := context.WithCancel(ctx)
	renewed := make(chan state.Lease, 1)
	go func() {
		defer close(renewed)
		t := time.NewTicker(leaseTTL / 3)
		defer t.Stop()
		for {
			select {
			case <-fctx.Done():
				renewed <- lease
				return
			case <-t.C:
				next, err := l.Store.RenewLease(fctx, lease)
				switch {
				case err == nil:
					lease = next
				case errors.Is(err, state.ErrLeaseLost):
					l.Log.Warn("lease lost", "lease", name, "err", err)
					cancel()
					renewed <- state.Lease{}
					return
				case fctx.Err() == nil:
					l.Log.Warn("lease not renewed; trying again", "lease", name, "err", err)
				}
			}
		}
	}()
	err = fn(fctx)
	cancel()
	if last := <-renewed; last.Name != "" {
		rctx, rcancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer rcancel()
		if rerr := l.Store.ReleaseLease(rctx, last); rerr != nil && !errors.Is(rerr, state.ErrLeaseLost) {
			l.Log.Warn("lease not released; it expires", "lease", name, "err", rerr)
		}
	}
	return err
}
