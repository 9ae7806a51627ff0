# cmake -DIN=file -DOUT=file.inc -P embed_text.cmake: IN's text as one C++ raw string literal,
# for bindings.cpp to export the layout header it was compiled with.
file(READ "${IN}" text)
file(WRITE "${OUT}" "R\"flr_text(${text})flr_text\"\n")
