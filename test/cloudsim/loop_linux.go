package cloudsim

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/volumed/volumed/devagent/loopdev"
)

// loops creates and removes this simulator's loop devices: the ones bound
// to a backing file under dir. It never removes any other loop device. Its
// methods run with the simulator's execMu held.
type loops struct {
	dir string
	// devs are the devices this simulator made or found bound to its
	// files, by path; only these are ever removed.
	devs map[string]*loopdev.Device
}

// newLoops checks that loop devices can be made (root, /dev/loop-control).
func newLoops(dir string) (*loops, error) {
	if err := loopdev.Available(); err != nil {
		return nil, err
	}
	return &loops{dir: dir, devs: map[string]*loopdev.Device{}}, nil
}

// attach creates a NEW loop device (LOOP_CTL_ADD of an unused index, so
// the kernel sends `add`) bound to backing. It returns /dev/loopN.
func (l *loops) attach(ctx context.Context, backing string) (string, error) {
	d, err := loopdev.Create(ctx, backing)
	if err != nil {
		return "", err
	}
	l.devs[d.Path] = d
	return d.Path, nil
}

// ours reports whether path lies under the simulator's directory.
func (l *loops) ours(path string) bool {
	return strings.HasPrefix(path, l.dir+string(filepath.Separator))
}

// scan finds this simulator's loop devices, the ones bound to a file under
// dir, and returns device path → backing file. They replace the devices
// known so far, so a device no longer bound to our file is never removed.
func (l *loops) scan() map[string]string {
	l.devs = map[string]*loopdev.Device{}
	out := map[string]string{}
	ents, _ := os.ReadDir("/sys/block")
	for _, e := range ents {
		if d, ok := loopdev.Lookup(e.Name()); ok && l.ours(d.Backing) {
			l.devs[d.Path] = d
			out[d.Path] = d.Backing
		}
	}
	return out
}

// detach unbinds and removes the loop device at path (the kernel sends
// `remove`), retrying while it is busy until ctx ends. Only a device this
// simulator made or found, still bound to the same backing file, is
// removed; any other gives loopdev.ErrNotOurs. A device already gone is not
// an error.
func (l *loops) detach(ctx context.Context, path string) error {
	d, ok := l.devs[path]
	if !ok {
		return fmt.Errorf("%s was not set up by this simulator: %w", path, loopdev.ErrNotOurs)
	}
	// Remove refuses a device re-bound, unbound or re-created since it was
	// set up (its diskseq changed); this check also refuses an unbound one
	// on kernels without diskseq.
	if b, bound := loopdev.BackingFile(d.Name()); !bound || b != d.Backing {
		delete(l.devs, path)
		if _, err := os.Stat(filepath.Join("/sys/block", d.Name())); errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("%s is no longer bound to %s: %w", path, d.Backing, loopdev.ErrNotOurs)
	}
	err := d.Remove(ctx)
	if err == nil || errors.Is(err, loopdev.ErrNotOurs) {
		delete(l.devs, path)
	}
	return err
}

// resize makes the loop device at path take its backing file's current
// size (LOOP_SET_CAPACITY; the kernel sends `change`).
func (l *loops) resize(path string) error {
	d, ok := l.devs[path]
	if !ok {
		return fmt.Errorf("%s was not set up by this simulator: %w", path, loopdev.ErrNotOurs)
	}
	return d.Resize()
}
