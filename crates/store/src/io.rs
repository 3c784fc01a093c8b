//! Small positional-I/O helpers shared by the index and the replica writer.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Fill `buf` from `off`; bytes past the end of the file read as zeroes (a raw disk file
/// may be shorter than the disk it holds when its tail is a hole).
pub fn read_full_at(file: &File, buf: &mut [u8], off: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A `Read` over `file[pos..end]` with positional reads: never touches the shared cursor.
pub struct PosReader<'a> {
    pub file: &'a File,
    pub pos: u64,
    pub end: u64,
}

impl io::Read for PosReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.end.saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left) as usize;
        if n == 0 {
            return Ok(0);
        }
        let got = self.file.read_at(&mut buf[..n], self.pos)?;
        self.pos += got as u64;
        Ok(got)
    }
}
