//go:build !(darwin || dragonfly || freebsd || linux || netbsd || openbsd)

package queue

import (
	"fmt"
	"os"
	"path/filepath"
)

// lockDir creates the lock file but cannot lock it on this platform: the
// caller must make sure only one Queue uses dir.
func lockDir(dir string) (*os.File, error) {
	f, err := os.OpenFile(filepath.Join(dir, lockName), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("queue: opening lock file: %w", err)
	}
	return f, nil
}
