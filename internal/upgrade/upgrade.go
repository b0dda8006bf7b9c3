// Package upgrade keeps volumed's data readable across releases: each
// kind of data (the JetStream store of the data dir, the state store)
// records the format it is in, and at start a Plan migrates it, one
// ordered step at a time, to the format this release writes, or refuses
// data it cannot read (ErrRefused: exit status 2), so volumed never
// starts empty beside data it did not read.
//
// A step must be idempotent: a crash in the middle of it leaves the format
// recorded before it, so the next start runs it again from the beginning.
package upgrade

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
)

// ErrRefused marks data volumed will not start on: written by a newer
// release, or in a layout no step migrates.
var ErrRefused = errors.New("data refused")

// Marker reads and records the format of one kind of data.
type Marker interface {
	// Format is the recorded format; ok is false when none is (data
	// written before formats were recorded, or no data at all).
	Format(ctx context.Context) (format int, ok bool, err error)
	// SetFormat records format.
	SetFormat(ctx context.Context, format int) error
}

// Step migrates data from format From to From+1.
type Step struct {
	From int
	// Name says what the step does, for the log.
	Name string
	// Run migrates; it is idempotent (see the package comment).
	Run func(ctx context.Context, log *slog.Logger) error
}

// Plan brings one kind of data to Current.
type Plan struct {
	// Name of the data, for the log and errors ("data dir", "state store").
	Name string
	// Current is the format this release writes and reads.
	Current int
	Marker  Marker
	// Detect tells the format of data without a recorded one: Current for
	// none at all (a first start) or for the layout that was current when
	// formats began to be recorded; an older format for an older layout.
	Detect func(ctx context.Context) (int, error)
	// Steps, one From each, for every format older than Current that can
	// be migrated; in any order.
	Steps []Step
}

// Run migrates the data to p.Current, recording the format after each
// step, and logs what it did. It refuses (ErrRefused) data of a format
// above Current, or below it with a missing step.
func (p Plan) Run(ctx context.Context, log *slog.Logger) error {
	log = log.With("component", "upgrade", "data", p.Name)
	format, recorded, err := p.Marker.Format(ctx)
	if err != nil {
		return fmt.Errorf("upgrade: %s: read format: %w", p.Name, err)
	}
	if !recorded {
		if format, err = p.Detect(ctx); err != nil {
			return fmt.Errorf("upgrade: %s: detect format: %w", p.Name, err)
		}
	}
	if format > p.Current {
		return fmt.Errorf("upgrade: %s: %w: it is in format %d, written by a newer volumed; this release reads formats up to %d: run that release or a newer one",
			p.Name, ErrRefused, format, p.Current)
	}
	steps := make(map[int]Step, len(p.Steps))
	for _, s := range p.Steps {
		steps[s.From] = s
	}
	for f := format; f < p.Current; f++ {
		if _, ok := steps[f]; !ok {
			return fmt.Errorf("upgrade: %s: %w: it is in format %d, which this release (format %d) cannot migrate: upgrade through an earlier release first",
				p.Name, ErrRefused, format, p.Current)
		}
	}
	for ; format < p.Current; format++ {
		s := steps[format]
		log.Info("migrating", "from", format, "to", format+1, "step", s.Name)
		if err := s.Run(ctx, log.With("step", s.Name)); err != nil {
			return fmt.Errorf("upgrade: %s: %s (format %d to %d): %w", p.Name, s.Name, format, format+1, err)
		}
		if err := p.Marker.SetFormat(ctx, format+1); err != nil {
			return fmt.Errorf("upgrade: %s: record format %d: %w", p.Name, format+1, err)
		}
		log.Info("migrated", "format", format+1, "step", s.Name)
	}
	if !recorded {
		if err := p.Marker.SetFormat(ctx, p.Current); err != nil {
			return fmt.Errorf("upgrade: %s: record format %d: %w", p.Name, p.Current, err)
		}
	}
	return nil
}
