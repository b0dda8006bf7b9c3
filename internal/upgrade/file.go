package upgrade

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// FileMarker records a format in a small JSON file ({"format": N}),
// replaced atomically.
type FileMarker struct{ Path string }

var _ Marker = FileMarker{}

// Format reads the file; no file is no recorded format.
func (m FileMarker) Format(context.Context) (int, bool, error) {
	data, err := os.ReadFile(m.Path)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, err
	}
	var v struct {
		Format *int `json:"format"`
	}
	if err := json.Unmarshal(data, &v); err != nil || v.Format == nil {
		return 0, false, fmt.Errorf("%w: %s is not a format record: %q", ErrRefused, m.Path, data)
	}
	return *v.Format, true, nil
}

// SetFormat writes the file through a temporary one and a rename.
func (m FileMarker) SetFormat(_ context.Context, format int) error {
	if err := os.MkdirAll(filepath.Dir(m.Path), 0o750); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(m.Path), "."+filepath.Base(m.Path)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	_, err = fmt.Fprintf(tmp, "{\"format\": %d}\n", format)
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	return os.Rename(tmp.Name(), m.Path)
}
