package handlers

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"

	"github.com/volumed/volumed/state"
)

// Leases (in the store) that serialize work across instances.
const (
	// leaseSweep: one instance at a time requeues operations whose job is
	// missing.
	leaseSweep = "sweep"
	// leaseReconcile: one instance at a time reconciles CloudStack,
	// mappings, devices and exports.
	leaseReconcile = "reconcile"
	// leaseVMPrefix + vm id: attaches to a VM whose disks carry no
	// identity run one at a time, from the CloudStack call to the match.
	leaseVMPrefix = "vm:"
)

// leaseTTL is how long a lease outlives a holder that stopped renewing
// it (a crash); it is renewed every third of it.
const leaseTTL = 15 * time.Second

// leased runs fn holding the lease name. With wait false it returns
// state.ErrLeaseHeld at once when another instance holds the lease;
// otherwise it waits for it until ctx ends. fn's context ends when the
// lease is lost (not renewed in time), so work that needs exclusivity
// stops.
func (s *Service) leased(ctx context.Context, name string, wait bool, fn func(ctx context.Context) error) error {
	// Each acquisition is its own holder: the store lets a holder take its
	// lease again, and two goroutines of this process must exclude each
	// other too.
	holder := s.holder + "/" + uuid.NewString()[:8]
	l, err := s.cfg.Store.AcquireLease(ctx, name, holder, leaseTTL)
	for delay := 50 * time.Millisecond; wait && errors.Is(err, state.ErrLeaseHeld); delay = min(2*delay, time.Second) {
		select {
		case <-time.After(delay):
		case <-ctx.Done():
			return fmt.Errorf("lease %s: %w", name, ctx.Err())
		}
		l, err = s.cfg.Store.AcquireLease(ctx, name, holder, leaseTTL)
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
				renewed <- l
				return
			case <-t.C:
				next, err := s.cfg.Store.RenewLease(fctx, l)
				switch {
				case err == nil:
					l = next
				case errors.Is(err, state.ErrLeaseLost):
					s.log.Warn("lease lost", "lease", name, "err", err)
					cancel()
					renewed <- state.Lease{}
					return
				case fctx.Err() == nil:
					s.log.Warn("lease not renewed; trying again", "lease", name, "err", err)
				}
			}
		}
	}()
	err = fn(fctx)
	cancel()
	if last := <-renewed; last.Name != "" {
		rctx, rcancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer rcancel()
		if rerr := s.cfg.Store.ReleaseLease(rctx, last); rerr != nil && !errors.Is(rerr, state.ErrLeaseLost) {
			s.log.Warn("lease not released; it expires", "lease", name, "err", rerr)
		}
	}
	return err
}
