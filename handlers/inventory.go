package handlers

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/volumed/volumed/csapi"
)

// Inventory defaults.
const (
	// DefaultInventoryInterval is how often the pre-check cache is refreshed
	// in the background.
	DefaultInventoryInterval = time.Minute
	// inventoryMissGap: a miss does not refresh a list refreshed more
	// recently than this; that list answers it.
	inventoryMissGap = time.Second
	// inventoryRefreshTimeout bounds one refresh of one list.
	inventoryRefreshTimeout = 30 * time.Second
)

// Catalogue is the part of CloudStack the pre-check cache lists.
type Catalogue interface {
	// ListZones lists every zone.
	ListZones(ctx context.Context) ([]csapi.Zone, error)
	// ListDiskOfferings lists every disk offering.
	ListDiskOfferings(ctx context.Context) ([]csapi.DiskOffering, error)
	// ListVMs lists every VM.
	ListVMs(ctx context.Context) ([]csapi.VM, error)
}

var _ Catalogue = csapi.API(nil)

// lookup is what the cache knows of an id.
type lookup int

const (
	// unsure: CloudStack could not be asked in time; the command goes on.
	unsure lookup = iota
	// present: CloudStack lists the id.
	present
	// absent: a list fresher than the question does not have the id.
	absent
)

// inventory caches the CloudStack entities that do not go stale within
// seconds (zones, disk offerings, VMs) for the accept pre-checks. Each
// list is refreshed in the background and on a miss; concurrent misses
// share one refresh, which runs under the service's context, not the
// asker's, so an asker that gives up does not cut it short.
type inventory struct {
	zones, offerings, vms *entitySet
}

func newInventory(c Catalogue, log *slog.Logger) *inventory {
	return &inventory{
		zones: newEntitySet("zones", log, func(ctx context.Context) ([]string, error) {
			zs, err := c.ListZones(ctx)
			return idsOf(zs, err, func(z csapi.Zone) string { return z.ID })
		}),
		offerings: newEntitySet("disk offerings", log, func(ctx context.Context) ([]string, error) {
			os, err := c.ListDiskOfferings(ctx)
			return idsOf(os, err, func(o csapi.DiskOffering) string { return o.ID })
		}),
		vms: newEntitySet("vms", log, func(ctx context.Context) ([]string, error) {
			vms, err := c.ListVMs(ctx)
			return idsOf(vms, err, func(vm csapi.VM) string { return vm.ID })
		}),
	}
}

// byID maps a list answer by its ids.
func byID[T any](items []T, id func(T) string) map[string]T {
	out := make(map[string]T, len(items))
	for _, it := range items {
		out[id(it)] = it
	}
	return out
}

// idsOf maps a list answer to its ids.
func idsOf[T any](items []T, err error, id func(T) string) ([]string, error) {
	if err != nil {
		return nil, err
	}
	out := make([]string, len(items))
	for i, it := range items {
		out[i] = id(it)
	}
	return out, nil
}

// sets lists the cached kinds.
func (inv *inventory) sets() []*entitySet { return []*entitySet{inv.zones, inv.offerings, inv.vms} }

// run refreshes every list now and then every interval, until ctx ends.
func (inv *inventory) run(ctx context.Context, interval time.Duration, wg *sync.WaitGroup) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		for _, set := range inv.sets() {
			set.start(ctx, wg)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// entitySet is the cached id list of one kind.
type entitySet struct {
	kind string
	log  *slog.Logger
	list func(ctx context.Context) ([]string, error)

	mu  sync.Mutex
	ids map[string]struct{}
	// loaded is when the last successful refresh began.
	loaded time.Time
	// running is closed when the refresh in progress ends; nil when none.
	running chan struct{}
}

func newEntitySet(kind string, log *slog.Logger, list func(ctx context.Context) ([]string, error)) *entitySet {
	return &entitySet{kind: kind, log: log, list: list}
}

// lookup answers from the cache; a miss waits, at most until ctx ends, for
// a refresh begun after the question (or at most inventoryMissGap
// before). svc is the context refreshes run under.
func (e *entitySet) lookup(ctx, svc context.Context, wg *sync.WaitGroup, id string) lookup {
	fresh := time.Now().Add(-inventoryMissGap)
	e.mu.Lock()
	_, ok := e.ids[id]
	recent := !e.loaded.Before(fresh)
	var done <-chan struct{}
	if !ok && !recent {
		done = e.startLocked(svc, wg)
	}
	e.mu.Unlock()
	switch {
	case ok:
		return present
	case recent:
		return absent
	}
	select {
	case <-done:
	case <-ctx.Done():
		return unsure
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	switch _, ok := e.ids[id]; {
	case ok:
		return present
	case !e.loaded.Before(fresh):
		return absent
	}
	return unsure // the refresh failed, or was one begun long before the question
}

// start begins a refresh unless one is running.
func (e *entitySet) start(svc context.Context, wg *sync.WaitGroup) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.startLocked(svc, wg)
}

// startLocked begins a refresh unless one is running and returns the
// channel closed when it ends. e.mu is held.
func (e *entitySet) startLocked(svc context.Context, wg *sync.WaitGroup) <-chan struct{} {
	if e.running != nil {
		return e.running
	}
	done := make(chan struct{})
	e.running = done
	wg.Add(1)
	go func() {
		defer wg.Done()
		begun := time.Now()
		ctx, cancel := context.WithTimeout(svc, inventoryRefreshTimeout)
		list, err := e.list(ctx)
		cancel()
		e.mu.Lock()
		if err == nil {
			set := make(map[string]struct{}, len(list))
			for _, id := range list {
				set[id] = struct{}{}
			}
			e.ids, e.loaded = set, begun
		}
		e.running = nil
		e.mu.Unlock()
		close(done)
		if err != nil && svc.Err() == nil {
			e.log.Warn("pre-check cache not refreshed", "kind", e.kind, "err", err)
		}
	}()
	return done
}
