"""Capture on real files the tests write: OpenCV video, PNG folders, DICOM via pydicom."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
from conftest import retime_mp4, scene_frames, write_dicom, write_labels, write_pngs, write_video

from guidance.capture import open_source
from guidance.capture.base import NewestFrameSlot
from guidance.errors import BadInputError


def drain(source, limit: int = 1000) -> list:
    """Every frame a source delivers until it ends (no timing: waits on the hand-over)."""
    frames = []
    source.start()
    deadline = time.monotonic() + 30
    while not source.ended and time.monotonic() < deadline and len(frames) < limit:
        frame = source.read(0.2)
        if frame is not None:
            frames.append(frame)
    source.stop()
    return frames


@pytest.mark.parametrize("suffix", [".mp4", ".avi", ".mkv"])
def test_video_files_replay_every_frame_in_order(tmp_path, suffix):
    frames = scene_frames(6, size=(48, 64))
    path = write_video(tmp_path / f"loop{suffix}", frames, fps=12.0)
    source = open_source(str(path), pace=False)
    assert source.info.kind == "replay" and source.info.fps == pytest.approx(12.0)
    assert (source.info.width, source.info.height) == (64, 48)
    got = drain(source)
    assert [f.index for f in got] == list(range(6))
    assert source.dropped_frames == 0
    stamps = [f.capture_mono_ns for f in got]
    assert stamps == sorted(stamps)
    # lossy codecs: close to what was written, and each frame is its own
    grey = got[3].image
    assert grey.ndim == 2  # colour video is converted to grey by capture
    assert np.abs(grey.astype(int) - frames[3].astype(int)).mean() < 6


@pytest.mark.parametrize("kind", ["mp4", "png", "dicom"])
def test_inline_replay_gives_the_threaded_replays_frames_without_a_thread(tmp_path, kind):
    """Offline evaluation with one thread per loop decodes in read(): the same frames, errors
    included, in order, then `ended`; no reader thread is started."""
    frames = scene_frames(5, size=(40, 48))
    if kind == "mp4":
        path = write_video(tmp_path / "loop.mp4", frames, fps=10.0)
    elif kind == "png":
        path = write_pngs(tmp_path / "loop", frames)
        (path / "000002.png").write_bytes(b"not a png")
    else:
        path = write_dicom(tmp_path / "cine.dcm", frames, "MONOCHROME2", 8, "explicit")
    threaded = drain(open_source(str(path), pace=False, fps=10))
    source = open_source(str(path), pace=False, fps=10, inline=True)
    inline = drain(source)
    assert source._thread is None and source.ended and source.read(0.01) is None
    assert [f.index for f in inline] == [f.index for f in threaded] == list(range(5))
    for a, b in zip(inline, threaded, strict=True):
        assert (a.image is None) == (b.image is None) and a.error == b.error
        if a.image is not None:
            assert np.array_equal(a.image, b.image)
    if kind == "png":
        assert inline[2].image is None and "000002.png" in inline[2].error
    with pytest.raises(ValueError, match="lossless"):
        open_source(str(path), pace=True, inline=True)


def test_sidecar_labels_give_fps_spacing_and_side(tmp_path):
    path = write_video(tmp_path / "loop.mp4", scene_frames(3, size=(48, 64)), fps=25.0)
    write_labels(tmp_path / "loop", fps=15.0, pixel_spacing_mm=0.2, posterior_side="left")
    info = open_source(str(path), pace=False).info
    assert info.fps == 15.0 and info.pixel_spacing_mm == 0.2 and info.posterior_side == "left"


def test_the_view_comes_from_the_sidecar_or_the_dicom_view_position(tmp_path):
    import json

    from pydicom import dcmread

    path = write_video(tmp_path / "loop.mp4", scene_frames(3, size=(48, 64)))
    labels = write_labels(tmp_path / "loop", fps=15.0, posterior_side=None)
    assert open_source(str(path), pace=False).info.view == "lateral"
    labels.write_text(json.dumps({**json.loads(labels.read_text()), "view": "ap"}))
    assert open_source(str(path), pace=False).info.view == "ap"

    cine = write_dicom(tmp_path / "cine.dcm", scene_frames(2, size=(32, 32)))
    assert open_source(str(cine), pace=False).info.view is None  # says nothing: the service assumes lateral
    for position, view in (("LL", "lateral"), ("RL", "lateral"), ("AP", "ap"), ("PA", "ap"), ("OBL", None)):
        ds = dcmread(str(cine))
        ds.ViewPosition = position
        ds.save_as(str(cine))
        assert open_source(str(cine), pace=False).info.view == view, position


def test_png_folder_8_and_16_bit(tmp_path):
    frames8 = scene_frames(4, size=(40, 50))
    src = open_source(str(write_pngs(tmp_path / "p8", frames8)), pace=False, fps=10)
    got = drain(src)
    assert len(got) == 4 and got[2].image.dtype == np.uint8
    assert np.array_equal(got[2].image, frames8[2])
    frames16 = [f.astype(np.uint16) * 257 for f in frames8]
    got16 = drain(open_source(str(write_pngs(tmp_path / "p16", frames16)), pace=False, fps=10))
    assert got16[1].image.dtype == np.uint16 and np.array_equal(got16[1].image, frames16[1])


def test_png_folder_corrupt_frame_is_an_error_frame_not_the_end(tmp_path):
    folder = write_pngs(tmp_path / "loop", scene_frames(5, size=(40, 50)))
    (folder / "000002.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    got = drain(open_source(str(folder), pace=False, fps=10))
    assert [f.index for f in got] == [0, 1, 2, 3, 4]
    assert got[2].image is None and "000002.png" in got[2].error
    assert got[3].image is not None


@pytest.mark.parametrize(
    "photometric,bits,syntax",
    [
        ("MONOCHROME2", 8, "explicit"),
        ("MONOCHROME1", 8, "explicit"),
        ("MONOCHROME2", 12, "explicit"),
        ("MONOCHROME1", 16, "explicit"),
        ("MONOCHROME2", 16, "rle"),
        ("MONOCHROME1", 10, "rle"),
        ("MONOCHROME2", 8, "jpeg"),
    ],
)
def test_dicom_multiframe(tmp_path, photometric, bits, syntax):
    frames = scene_frames(4, size=(40, 48))
    path = write_dicom(tmp_path / "cine.dcm", frames, photometric, bits, syntax)
    source = open_source(str(path), pace=False)
    info = source.info
    assert info.frame_count == 4 and info.fps == pytest.approx(15.0, rel=1e-3)
    assert info.pixel_spacing_mm == pytest.approx(0.3)
    got = drain(source)
    assert len(got) == 4
    image = got[2].image
    assert image.dtype == (np.uint8 if bits <= 8 else np.uint16)
    # MONOCHROME1 comes out inverted back: bright = cement in both
    expected = frames[2].astype(float) / 255 * ((1 << bits) - 1)
    tolerance = 0.03 * (1 << bits) if syntax == "jpeg" else 1.0
    assert np.abs(image.astype(float) - expected).mean() < tolerance


def test_dicom_single_frame_and_no_frame_time(tmp_path):
    path = write_dicom(tmp_path / "one.dcm", scene_frames(1, size=(32, 32)), frame_time_ms=None, spacing=None)
    source = open_source(str(path), pace=False)
    assert source.info.frame_count == 1 and source.info.fps is None
    assert source.info.pixel_spacing_mm is None
    got = drain(source)
    assert len(got) == 1 and got[0].image.shape == (32, 32)


def test_dicom_corrupt_frame_mid_stream(tmp_path):
    from pydicom import dcmread
    from pydicom.encaps import encapsulate, generate_frames

    path = write_dicom(tmp_path / "cine.dcm", scene_frames(4, size=(32, 32)), syntax="rle")
    ds = dcmread(str(path))
    frames = list(generate_frames(ds.PixelData, number_of_frames=4))
    frames[1] = b"\xff" * 8 + frames[1][8:]  # frame 1's RLE header ruined
    ds.PixelData = encapsulate(frames)
    ds.save_as(str(path))
    got = drain(open_source(str(path), pace=False))
    assert [f.index for f in got] == [0, 1, 2, 3]
    assert got[1].image is None and "frame 1" in got[1].error
    assert got[0].image is not None and got[2].image is not None


@pytest.mark.parametrize(
    "make,expected",
    [
        (lambda d: d / "missing.mp4", "no such file"),
        (lambda d: (d / "notes.mp4").write_text("hello") and d / "notes.mp4", "not a video"),
        (lambda d: (d / "x.dcm").write_bytes(b"nonsense") and d / "x.dcm", "DICOM"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "no 000000.png"),
        (lambda d: (d / "x.txt").write_text("1") and d / "x.txt", "unknown file type"),
    ],
)
def test_bad_sources_are_refused_naming_them(tmp_path, make, expected):
    path = make(tmp_path)
    with pytest.raises(BadInputError) as err:
        open_source(str(path))
    assert str(path) in str(err.value) and expected in str(err.value)


def test_dicom_without_pixels_is_refused(tmp_path):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.PatientName = "Test"
    ds.save_as(str(tmp_path / "nopix.dcm"), enforce_file_format=True)
    with pytest.raises(BadInputError, match="no pixel data|without pixel data"):
        open_source(str(tmp_path / "nopix.dcm"))


def test_live_reader_keeps_only_the_newest_frame_and_counts_drops(tmp_path):
    """A video file opened as a live device: the reader thread runs as fast as OpenCV decodes,
    the consumer takes a frame only now and then, so frames are replaced unread (dropped)."""
    path = write_video(tmp_path / "live.avi", scene_frames(40, size=(48, 64)), fps=30.0)
    source = open_source(str(path), kind="live", reconnect_s=0.05)
    assert source.info.kind == "live"
    source.start()
    got = []
    while len(got) < 5:
        frame = source.read(1.0)
        assert frame is not None
        got.append(frame)
        # wait until the reader has produced more frames than we took
        deadline = time.monotonic() + 5
        while source.frames_read < got[-1].index + 3 and time.monotonic() < deadline:
            time.sleep(0.001)
    source.stop()  # joins the reader: the counters are final
    # stopped, the slot is closed and gives back at once what the reader left in it (0 or 1)
    leftover = source.read(0.0)
    assert source.read(0.0) is None
    assert source.dropped_frames > 0
    indices = [f.index for f in got]
    assert indices == sorted(indices) and len(set(indices)) == len(indices)
    # every frame that left the device was taken, replaced unread (dropped) or is the one
    # still in the slot: the frames the consumer never saw (the gaps in its indices) are
    # exactly the drops, none lost uncounted, none counted twice
    delivered = len(got) + (leftover is not None)
    assert source.dropped_frames == source.frames_read - delivered
    assert leftover is None or leftover.index == source.frames_read - 1


def test_slot_lossy_and_lossless():
    import threading

    from guidance.capture.base import Frame, SourceInfo

    info = SourceInfo("t", "replay")
    stop = threading.Event()
    lossy = NewestFrameSlot(lossy=True)
    for i in range(3):
        lossy.put(Frame(i, 0, None, info), stop)
    assert lossy.get(0.1).index == 2 and lossy.dropped == 2
    lossless = NewestFrameSlot(lossy=False)
    lossless.put(Frame(0, 0, None, info), stop)
    t = threading.Thread(target=lossless.put, args=(Frame(1, 0, None, info), stop))
    t.start()
    assert lossless.get(1.0).index == 0
    t.join(2.0)
    assert lossless.get(1.0).index == 1 and lossless.dropped == 0


def test_paced_replay_follows_the_loop_fps(tmp_path):
    path = write_video(tmp_path / "loop.avi", scene_frames(6, size=(32, 32)), fps=50.0)
    source = open_source(str(path), pace=True)
    before_ns = time.monotonic_ns()  # the reader's t0 comes after this
    got = drain(source)
    assert [f.index for f in got] == list(range(6))
    # frame i is not released (nor stamped) before t0 + i * 20 ms: the lower bound the pacing
    # guarantees, exact in ns. Measured from frame 0's stamp instead, the bound would lose
    # frame 0's decode time, which a loaded machine can stretch.
    for frame in got:
        assert frame.capture_mono_ns - before_ns >= frame.index * 20_000_000, frame.index
    # and paced at the loop's 50 fps, not a slower rate (loose: a loaded 2-core CI machine)
    span_ms = (got[-1].capture_mono_ns - got[0].capture_mono_ns) / 1e6
    assert span_ms <= 5 * 100.0


def test_paced_dicom_replay_keeps_the_recorded_frame_times(tmp_path):
    """A Frame Time Vector (0018,1065) gives the gaps between frames as acquired (pulsed
    fluoroscopy is uneven): paced replay releases each frame at its own recorded time; the
    frame rate is their mean; a forced --fps replays at that rate instead."""
    vector = [0, 30, 30, 150, 30]  # ms: a 150 ms pause between frames 2 and 3
    path = write_dicom(
        tmp_path / "cine.dcm", scene_frames(5, size=(32, 32)), frame_time_ms=None, frame_time_vector_ms=vector
    )
    source = open_source(str(path), pace=True)
    assert source.frame_offsets_ns == [0, 30_000_000, 60_000_000, 210_000_000, 240_000_000]
    assert source.info.fps == pytest.approx(4 * 1000 / 240) and source.info.extra["timing"] == "Frame Time Vector"
    before_ns = time.monotonic_ns()
    got = drain(source)
    assert [f.index for f in got] == list(range(5))
    for frame in got:  # never released before its recorded time (exact lower bound)
        assert frame.capture_mono_ns - before_ns >= source.frame_offsets_ns[frame.index], frame.index
    # at 16.7 fps evenly, frame 3 would be due at 180 ms: it waits for its 210
    forced = open_source(str(path), pace=True, fps=50.0)
    assert forced.frame_offsets_ns is None and forced.info.fps == 50.0
    forced.stop()


def test_paced_video_replay_keeps_the_videos_own_frame_times(tmp_path):
    """An MP4 with variable frame timing (a 200 ms pause between frames 2 and 3, as a recorder
    of pulsed fluoroscopy writes it): paced replay releases each frame at its own timestamp;
    a forced --fps, or an fps in the labels sidecar, replays evenly instead."""
    path = write_video(tmp_path / "pulsed.mp4", scene_frames(6, size=(32, 32)), fps=15.0)
    # OpenCV writes a 15 fps track in 1/15360 s: 1024 a frame; these keep the total
    retime_mp4(path, [256, 256, 3072, 256, 256, 2048])
    source = open_source(str(path), pace=True)
    assert source.info.extra["timing"] == "video timestamps" and source.info.fps == pytest.approx(15.0)
    before_ns = time.monotonic_ns()
    got = drain(source)
    assert [f.index for f in got] == list(range(6))
    recorded_ms = [0, 1000 / 60, 2000 / 60, 14000 / 60, 15000 / 60, 16000 / 60]
    assert source.frame_offsets_ns == [pytest.approx(t * 1e6, abs=1e3) for t in recorded_ms]
    for frame in got:  # never released before its recorded time (exact lower bound)
        assert frame.capture_mono_ns - before_ns >= source.frame_offsets_ns[frame.index], frame.index
    # evenly at 15 fps frame 3 would be due at 200 ms: it waited for its 233
    assert got[3].capture_mono_ns - before_ns >= 233e6
    forced = open_source(str(path), pace=True, fps=50.0)
    assert forced.frame_offsets_ns is None and forced.info.extra["timing"] == "fps"
    forced.stop()
    write_labels(tmp_path / "pulsed", fps=15.0)
    beside = open_source(str(path), pace=True)
    assert beside.frame_offsets_ns is None and beside.info.extra["timing"] == "fps"
    beside.stop()
    unpaced = open_source(str(path), pace=False)
    assert unpaced.frame_offsets_ns is None and len(drain(unpaced)) == 6


def test_broken_video_timestamps_leave_the_rest_of_the_loop_to_its_frame_rate(tmp_path):
    """A timestamp that repeats (or goes back, or jumps more than 10 s) is not a frame time:
    from that frame on the loop is paced at its frame rate, one period after the last good."""
    path = write_video(tmp_path / "broken.mp4", scene_frames(6, size=(32, 32)), fps=15.0)
    retime_mp4(path, [1024, 0, 2048, 1024, 1024, 1024])  # frames 1 and 2 both at 66.7 ms
    source = open_source(str(path), pace=True)
    before_ns = time.monotonic_ns()
    got = drain(source)
    assert [f.index for f in got] == list(range(6))
    period_ns = 1e9 / 15
    due = [source._offset_ns(i, int(period_ns)) for i in range(6)]
    assert due == [pytest.approx(i * period_ns, abs=1e3) for i in range(6)]
    assert source.info.extra["timing"] == "video timestamps to frame 1, then fps"
    for frame in got:
        assert frame.capture_mono_ns - before_ns >= due[frame.index], frame.index


@pytest.mark.parametrize("vector", [[0, 30, 30], [0, 30, -5, 30, 30], [0, 30, 30, 30, 30, 30]])
def test_a_frame_time_vector_that_does_not_fit_is_left_for_the_frame_rate(tmp_path, vector):
    path = write_dicom(
        tmp_path / "cine.dcm", scene_frames(5, size=(32, 32)), frame_time_ms=40.0, frame_time_vector_ms=vector
    )
    source = open_source(str(path), pace=True)
    assert source.frame_offsets_ns is None and source.info.fps == pytest.approx(25.0)
    assert source.info.extra["timing"] == "fps"
    source.stop()


def test_simulated_source(tmp_path):
    source = open_source("simulated:venous", pace=False)
    assert source.info.kind == "simulated"
    got = drain(source, limit=3)
    assert source.info.name == "simulated:venous" and source.info.frame_count == 60
    # lossless (pace=False): the first three frames, in order, none dropped
    assert [f.index for f in got] == [0, 1, 2] and source.dropped_frames == 0
    for frame in got:
        assert frame.image.dtype == np.uint8 and frame.image.shape == (source.info.height, source.info.width)


def test_grey_video_is_read_from_its_luma_plane_as_the_bgr_decode_reads_it(tmp_path, capfd):
    """The fast path (no BGR conversion) delivers the grey that decoding to BGR and
    converting gives, within LUMA_TOLERANCE; a flat first frame, which cannot show the
    mapping, keeps the BGR decode."""
    from guidance.capture.replay import LUMA_TOLERANCE

    frames = scene_frames(8, size=(96, 128))
    for name, loop in (("scene", frames), ("flat_start", [np.zeros_like(frames[0])] + frames)):
        path = write_video(tmp_path / f"{name}.mp4", loop)
        source = open_source(str(path), pace=False)
        assert source.info.extra["decode"] == ("luma" if name == "scene" else "bgr")
        got = [f.image for f in drain(source)]
        cap = cv2.VideoCapture(str(path))
        expected = []
        while True:
            ok, image = cap.read()
            if not ok:
                break
            expected.append(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))
        cap.release()
        assert len(got) == len(expected) == len(loop)
        for a, b in zip(got, expected, strict=True):
            assert a.dtype == np.uint8 and a.shape == b.shape
            assert np.abs(a.astype(int) - b).max() <= LUMA_TOLERANCE
    # OpenCV warns on each such read; none of it may reach the console
    assert "WARN" not in capfd.readouterr().err


@pytest.mark.parametrize("threads", [1, 2])
def test_video_decoding_keeps_to_opencvs_thread_budget(tmp_path, threads):
    """An evaluation worker sized to one core (cv2.setNumThreads(1)) decodes on one thread:
    left alone, FFmpeg starts a decoding thread per visible CPU."""
    path = write_video(tmp_path / "loop.mp4", scene_frames(4, size=(48, 64)))
    before = cv2.getNumThreads()
    cv2.setNumThreads(threads)
    try:
        source = open_source(str(path), pace=False, inline=True)
        assert source.info.extra["decode"] == "luma"  # the capture kept is the luma one
        assert source._cap.get(cv2.CAP_PROP_N_THREADS) == threads
        assert len(drain(source)) == 4
    finally:
        cv2.setNumThreads(before)


def test_live_streams_decode_on_one_thread(tmp_path):
    """FFmpeg's frame threading holds back a frame per extra decoding thread: a live stream
    (here an MP4, whose decoder threads) is decoded on one."""
    path = write_video(tmp_path / "live.mp4", scene_frames(4, size=(48, 64)))
    source = open_source(str(path), kind="live", reconnect_s=0.05)
    try:
        assert source._cap.get(cv2.CAP_PROP_N_THREADS) == 1
    finally:
        source.stop()
