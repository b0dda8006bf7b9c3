package state

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/internal/formation"
	"github.com/volumed/volumed/internal/upgrade"
)

// Formats of the records each store writes, recorded in the store itself
// (the KV key kvFormatKey, the Redis key <prefix>format) and migrated at
// start by Upgrade. To change a layout: raise the store's format, and add
// to kvSteps (or the Redis store's steps, state/redisstore) a step From
// the old format that rewrites the old layout into the new one,
// idempotently (see internal/upgrade).
const (
	// KVFormat 1: operations, mappings and exports under op., map. and
	// export., as since the first release.
	KVFormat = 1
)

// kvFormatKey is the bucket key of the embedded store's format; the
// store's watcher skips it.
const kvFormatKey = "meta.format"

// Upgrader is a store outside this package (state/redisstore) that brings
// its own records to its format.
type Upgrader interface {
	Upgrade(ctx context.Context, log *slog.Logger) error
}

// Upgrade brings the records of s to its store's format, or refuses them
// (upgrade.ErrRefused), before anything reads them. The embedded store's
// are brought by NewKV, before it reads them into its indexes.
func Upgrade(ctx context.Context, s Store, log *slog.Logger) error {
	switch s := s.(type) {
	case *KV:
		return nil
	case Upgrader:
		return s.Upgrade(ctx, log)
	}
	return fmt.Errorf("state: upgrade: unknown store %T", s)
}

// upgrade brings the bucket's records to KVFormat, or refuses them, before
// NewKV reads them or its index cache: a refused store leaves both as
// they were.
func (k *KV) upgrade(ctx context.Context, log *slog.Logger) error {
	return upgrade.Plan{Name: "embedded store " + k.bucket, Current: KVFormat, Marker: kvMarker{k},
		Detect: func(context.Context) (int, error) { return KVFormat, nil }, Steps: kvSteps(k)}.Run(ctx, log)
}

// kvSteps are the embedded store's migrations; none yet.
func kvSteps(*KV) []upgrade.Step { return nil }

// kvMarker records the embedded store's format under kvFormatKey. Its
// requests, made at start, wait for a cluster still forming or catching
// up (formation.Wait).
type kvMarker struct{ k *KV }

var _ upgrade.Marker = kvMarker{}

func (m kvMarker) Format(ctx context.Context) (int, bool, error) {
	var e jetstream.KeyValueEntry
	err := formation.Wait(ctx, m.k.log, "store format", func(ctx context.Context) error {
		var err error
		e, err = m.k.kv.Get(ctx, kvFormatKey)
		return err
	})
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, kvErr("read format", err)
	}
	return ParseFormat(string(e.Value()))
}

func (m kvMarker) SetFormat(ctx context.Context, format int) error {
	err := formation.Wait(ctx, m.k.log, "store format", func(ctx context.Context) error {
		_, err := m.k.kv.Put(ctx, kvFormatKey, []byte(strconv.Itoa(format)))
		return err
	})
	if err != nil {
		return kvErr("record format", err)
	}
	return nil
}

// ParseFormat reads a recorded format; anything else is refused.
func ParseFormat(s string) (int, bool, error) {
	f, err := strconv.Atoi(s)
	if err != nil || f < 0 {
		return 0, false, fmt.Errorf("state: %w: recorded format %q is not a number", upgrade.ErrRefused, s)
	}
	return f, true, nil
}
